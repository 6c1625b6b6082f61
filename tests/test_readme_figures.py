"""The README's main-job figure is re-measured here, so README and code cannot drift apart.

`itmzoo train configs/demo_synthetic.yaml` is run in-process with the unchanged config (seed 0) and its
test rsum must equal the figure the README quotes, to 0.1. The figure is read from README.md itself:
changing the code's result or the README alone fails this test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_RSUM = re.compile(r"test rsum (\d+\.\d)\b")


def readme_figure() -> float:
    """The test rsum the README quotes for the main job (exactly one such figure)."""
    found = README_RSUM.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(found) == 1, f"README.md: expected one 'test rsum NNN.N' figure for the main job, found {found}"
    return float(found[0])


def test_training_docs_quote_the_same_figure():
    row = [ln for ln in (ROOT / "docs" / "training.md").read_text(encoding="utf-8").splitlines()
           if ln.startswith("| `toy_vse`, test (200 images")]
    assert len(row) == 1, "docs/training.md: expected one table row for the main job's test recall"
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    recalls = [float(x) for c in cells[1:3] for x in c.split("/")]
    assert float(cells[3]) == readme_figure()
    assert sum(recalls) == pytest.approx(float(cells[3]), abs=0.051)  # rsum is the sum of the six recalls


@pytest.mark.slow
def test_main_job_reproduces_the_readme_figure(tmp_path):
    from itmzoo.config import load_run_config
    from itmzoo.train.run import run_training

    tree = load_run_config(ROOT / "configs" / "demo_synthetic.yaml")
    record = run_training(tree, tmp_path / "demo_synthetic", verbose=False)
    assert record["split"] == "test" and record["n_images"] == 200 and record["seed"] == 0
    assert record["chance"]["rsum"] == pytest.approx(15.9, abs=0.05)
    assert record["rsum"] == pytest.approx(readme_figure(), abs=0.1), (
        f"configs/demo_synthetic.yaml now gives test rsum {record['rsum']:.1f}; README.md says {readme_figure()}")
