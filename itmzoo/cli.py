"""Command line: ``itmzoo list | info | train | eval | convert | index | search | data check``.

Errors print one line (``itmzoo <command>: error: <Type>: <message>``) and exit with status 1;
``--debug`` (before or after the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import get_entry, list_models, split_name

    caps = {}
    for key in ("input_kind", "scoring", "text_backbone"):
        if getattr(args, key):
            caps[key] = getattr(args, key)
    if args.has_weights:
        caps["has_weights"] = True
    names = list_models(args.pattern, include_tags=args.tags, **caps)
    if args.names:
        for name in names:
            print(name)
        return 0
    if not names:
        print("no registered model matches", file=sys.stderr)
        return 0
    rows = []
    for name in names:
        method, tag = split_name(name)
        e = get_entry(method)
        weights = [t for t, tg in e.tags.items() if tg.source and (tag is None or t == tag)]
        rows.append([name, ", ".join(e.aliases) or "-", e.scoring, e.input_kind,
                     f"{e.image_backbone or '-'} / {e.text_backbone or '-'}", ", ".join(weights) or "-"])
    print(_table(rows, ["name", "aliases", "scoring", "input", "image / text backbone", "tags with weights"]))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .registry import model_info

    info = model_info(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']}" + (f" (aliases: {', '.join(info['aliases'])})" if info["aliases"] else ""))
    print(f"  paper:     {info['paper'] or '-'}")
    print(f"  upstream:  {info['upstream'] or '-'}")
    print(f"  scoring:   {info['scoring']}; input: {info['input_kind']}; image backbone: "
          f"{info['image_backbone'] or '-'}; text backbone: {info['text_backbone'] or '-'}")
    print(f"  converter: {'yes (itmzoo convert NAME FILE DIR)' if info['converter'] else 'no'}")
    print(f"  config ({info['config_class']}):")
    for k, v in info["config"].items():
        print(f"    {k} = {json.dumps(v)}")
    if info["tags"]:
        print("  tags" + (f" (default {info['default_tag']})" if info["default_tag"] else "") + ":")
        for tag, t in info["tags"].items():
            print(f"    {info['name']}.{tag}: dataset {t.get('dataset', '-')}"
                  + (f", license {t['license']}" if t.get("license") else ""))
            if t.get("source"):
                print(f"      weights:  {t['source']}")
            if t.get("overrides"):
                print(f"      config:   {', '.join(f'{k}={json.dumps(v)}' for k, v in t['overrides'].items())}")
            if t.get("expected"):
                print(f"      expected: {', '.join(f'{k} {v}' for k, v in t['expected'].items())}")
            if t.get("note"):
                print(f"      note:     {t['note']}")
    return 0


def _default_out(config: str | None) -> Path:
    return Path("runs") / (Path(config).stem if config else "run")


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_run_config

    tree = load_run_config(args.config, args.set or [])
    out = Path(args.out) if args.out else _default_out(args.config)
    if not args.resume and (out / "last").exists():
        raise FileExistsError(f"{out} already holds a run (last/); pass --resume to continue it or --out for a new one")
    from .train.run import run_training  # torch is imported only once the arguments are known to be fine
    try:
        run_training(tree, out, resume=args.resume)
    except KeyboardInterrupt:
        print(_interrupted_message(args, out), file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _interrupted_message(args: argparse.Namespace, out: Path) -> str:
    """What Ctrl-C left behind and how to continue."""
    from .train.checkpoint import STATE_FILE

    last = out / "last"
    again = " ".join(["itmzoo train", str(args.config), "--out", str(out)]
                     + [f"--set {s}" for s in (args.set or [])])
    if (last / STATE_FILE).is_file():
        saved = ""
        try:
            import torch

            state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
            saved = f" (after optimizer step {state['step']}; {state['epoch']} epoch(s) complete)"
        except Exception:  # noqa: BLE001  the message is a courtesy; never fail on it
            pass
        return (f"itmzoo train: interrupted; {last}/ holds the last checkpoint{saved}: steps after it are lost. "
                f"Continue with: {again} --resume")
    return (f"itmzoo train: interrupted before the first checkpoint (written at the end of epoch 1, or every "
            f"train.ckpt_every steps); nothing to resume in {out}. Start again with: {again}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model source shared by `eval` and `index`: a native directory, or a registry name + checkpoint."""
    p.add_argument("--model", help="registry name (with --checkpoint: an official or native checkpoint)")
    p.add_argument("--checkpoint", help="official checkpoint file or native directory for --model")
    p.add_argument("--pretrained", help="native directory written by save_pretrained / itmzoo train (DIR/best)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (repeatable)")


def _model_flags(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The values of one model source's flags: ``--{prefix}pretrained``, ``model``, ``checkpoint``, ``set``."""
    dest = prefix.replace("-", "_")
    return {k: getattr(args, dest + k, None) for k in ("pretrained", "model", "checkpoint", "set")}


def _check_model_args(args: argparse.Namespace, prefix: str = "") -> None:
    """One clear error for a missing, doubled or misplaced model source (before anything is built).

    `prefix` picks the flags: ``""`` for ``--pretrained/--model/--checkpoint``, ``"first-stage-"`` for
    ``--first-stage-pretrained`` and so on."""
    v = _model_flags(args, prefix)
    pre, mod, ck = (f"--{prefix}{k}" for k in ("pretrained", "model", "checkpoint"))
    if v["pretrained"] and Path(v["pretrained"]).is_file():
        raise ValueError(f"{pre} {v['pretrained']}: is a file; {pre} takes a native directory "
                         "(save_pretrained, itmzoo convert, DIR/best of a run); for an authors' checkpoint "
                         f"file use {mod} NAME {ck} FILE")
    if v["pretrained"] and (v["model"] or v["checkpoint"]):
        raise ValueError(f"give either {pre} DIR or {mod} NAME {ck} PATH, not both")
    if not (v["pretrained"] or v["model"]):
        raise ValueError(f"say which model: {pre} DIR, or {mod} NAME {ck} PATH")


def _parse_kv(items: Sequence[str], what: str) -> dict[str, Any]:
    from .config import parse_dotted

    out: dict[str, Any] = {}
    for item in items:
        k, v = parse_dotted(item)
        if "." in k:
            raise ValueError(f"{what} {item!r}: give a field name of the model config, not a dotted path")
        out[k] = v
    return out


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets, so ``num_images={train: 24, dev: 8}`` stays one item."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "{[("
        depth -= ch in "}])"
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_data_spec(text: str) -> dict[str, Any]:
    """``--data``: a YAML/JSON file, an inline mapping (``"{format: synthetic, split: test}"``) or
    comma-separated ``key=value`` pairs (``format=precomp,root=data/f30k_precomp,split=test``)."""
    import yaml

    from .config import parse_dotted

    p = Path(text)
    if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    elif text.lstrip().startswith("{"):
        spec = yaml.safe_load(text)
    else:
        spec = dict(parse_dotted(part) for part in _split_top_level(text) if part.strip())
    if not isinstance(spec, dict) or "format" not in spec:
        raise ValueError(f"--data {text!r}: expected a data spec with a 'format' key, e.g. "
                         "'format=synthetic,split=test' or a YAML file")
    return spec


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import api
    from . import distributed as D
    from .eval import chance_metrics, eval_options, format_metrics

    overrides = _parse_kv(args.set or [], "--set")
    # arguments first, so a typo fails before a process group or a model is set up
    opts = eval_options(protocol=args.protocol, batch_size=args.batch_size, text_batch_size=args.text_batch_size,
                        block=tuple(args.block) if args.block else None, rerank_k=args.rerank_k,
                        pair_batch_size=args.pair_batch_size, amp=args.amp,
                        progress=not args.quiet and sys.stderr.isatty(),
                        return_sims=bool(args.save_sims or args.save_ranks or args.report))
    spec = parse_data_spec(args.data)
    _check_model_args(args)
    _, world, local_rank = D.init_from_env()  # under torchrun every rank takes a share of the work
    main = D.is_main_process()
    try:
        import torch

        torch.manual_seed(args.seed)  # random weights (no checkpoint) are the same on every rank and in every run
        if args.pretrained:
            model = api.load(args.pretrained, **overrides)
            source = args.pretrained
        else:
            if not args.checkpoint and main:
                print(f"itmzoo eval: note: no --checkpoint, evaluating '{args.model}' with random weights",
                      file=sys.stderr)
            model = api.build(args.model, checkpoint=args.checkpoint, **overrides)
            source = args.checkpoint or "random weights"
        if args.device:
            device = args.device
        elif torch.cuda.is_available():
            device = f"cuda:{local_rank}" if world > 1 else "cuda"
        else:
            device = "cpu"
        model.to(device).eval()
        from .data import load_split

        split = load_split(dict(spec))
        from .eval import evaluate

        metrics = evaluate(model, split, options=opts, device=device)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if not main:
        return 0
    sims = metrics.pop("sims", None)
    ranks = None
    if args.save_ranks or args.report:  # one rank pass serves both
        from .eval import fold_ranks

        ranks = fold_ranks(sims, split, metrics["protocol"])
    if args.save_sims:
        _save_sims(args.save_sims, sims, split, metrics["protocol"])
        print(f"wrote {args.save_sims}")
    if args.save_ranks:
        _save_ranks(args.save_ranks, ranks, split, metrics["protocol"])
        print(f"wrote {args.save_ranks}")
    if args.report:
        from .eval.html import write_report

        page = write_report(args.report, {**metrics, "checkpoint": str(source)}, split, sims, ranks=ranks)
        print(f"report: {page}")
    metrics["checkpoint"] = str(source)
    print(f"{getattr(split, 'name', '') or 'split'} ({metrics['protocol']}, {metrics['n_images']} images, "
          f"{metrics['n_captions']} captions): {format_metrics(metrics)}")
    if "two_stage" in metrics:
        ts = metrics["two_stage"]
        print(f"two-stage: k = {ts['rerank_k']}; first stage alone: {format_metrics(ts['first_stage'])}")
    if args.chance:
        print(f"chance level: {format_metrics(chance_metrics(split.caption_to_image))}")
    expected = _expected_of(args.model, bool(args.checkpoint)) if args.model else {}
    if expected:
        from .eval.report import compare_expected, format_comparison

        rows = compare_expected(metrics, expected[1])
        if rows:
            print(f"expected by {expected[0]} (under {metrics['protocol']}):\n{format_comparison(rows)}")
            metrics["expected_comparison"] = {"tag": expected[0], "rows": rows}
        else:
            print(f"note: {expected[0]} states expected metrics for other protocols "
                  f"({', '.join(sorted({k.rpartition('.')[0] for k in expected[1]}))}), not {metrics['protocol']}")
    if args.out:
        from .checkpoints.atomic import write_text_atomic
        from .jsonfmt import dumps

        write_text_atomic(args.out, dumps(metrics, indent=2))
        print(f"wrote {args.out}")
    return 0


def _expected_of(name: str, has_checkpoint: bool) -> tuple[str, dict[str, float]] | None:
    """``(method.tag, expected metrics)`` of a named tag (or, with a checkpoint, the default tag), if any."""
    from .registry import get_entry, split_name

    method, tag = split_name(name)
    entry = get_entry(method)
    tag = tag or (entry.default_tag if has_checkpoint else None)
    if tag is None:
        return None
    tags = entry.tags  # get_entry imported the family module: the full declarations
    if tag not in tags or not tags[tag].expected:
        return None
    return f"{entry.name}.{tag}", dict(tags[tag].expected)


def _npz_name(fold: int, n_folds: int, key: str) -> str:
    return key if n_folds == 1 else f"fold{fold}_{key}"


def _save_sims(path: str, sims: Any, split: Any, protocol: str) -> None:
    """``--save-sims``: the ``[n_images, n_captions]`` score matrices (one per direction, per fold) as npz."""
    import numpy as np

    from .checkpoints.atomic import save_with
    from .eval import direction_matrices

    folds = direction_matrices(sims)
    arrays: dict[str, Any] = {"caption_to_image": np.asarray(split.caption_to_image)}
    for f, (i2t, t2i) in enumerate(folds):
        if i2t is t2i:
            arrays[_npz_name(f, len(folds), "sims")] = i2t.numpy()
        else:
            arrays.update({_npz_name(f, len(folds), f"sims_{k}"): v.numpy() for k, v in (("i2t", i2t), ("t2i", t2i))})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    save_with(path, write)


def _save_ranks(path: str, ranks: Any, split: Any, protocol: str) -> None:
    """``--save-ranks``: JSON, per fold of the protocol and direction, each query's 1-based rank of its
    ground truth (indices are positions in the split); `ranks` is `itmzoo.eval.fold_ranks`' list."""
    import numpy as np

    from .checkpoints.atomic import write_text_atomic
    from .jsonfmt import dumps

    c2i = np.asarray(split.caption_to_image)
    ids = list(split.image_ids) if split.image_ids is not None else list(range(split.num_images))
    folds = []
    for f in ranks:
        start, caps = f.first_image, f.captions
        folds.append({
            "i2t": [{"image": start + i, "image_id": ids[start + i], "rank": int(r) + 1}
                    for i, r in enumerate(f.i2t.tolist())],
            "t2i": [{"caption": int(caps[j]), "image": int(c2i[caps[j]]), "caption_text": split.captions[caps[j]],
                     "rank": int(r) + 1} for j, r in enumerate(f.t2i.tolist())]})
    out = {"protocol": protocol, "rank_base": 1, "folds": folds}
    write_text_atomic(path, dumps(out, indent=1))


def _model_for(args: argparse.Namespace, prefix: str = "") -> tuple[Any, dict[str, Any] | None]:
    """The model of ``--pretrained DIR`` or ``--model NAME [--checkpoint FILE]`` (flags named with `prefix`,
    as in `_check_model_args`) and how an index finds it again (None: random weights, which the index must
    carry)."""
    from . import api

    _check_model_args(args, prefix)
    v = _model_flags(args, prefix)
    overrides = _parse_kv(v["set"] or [], f"--{prefix}set")
    if v["pretrained"]:
        if overrides:
            raise ValueError(f"--{prefix}set changes the config of --{prefix}model; a --{prefix}pretrained "
                             "directory keeps its own")
        return api.load(v["pretrained"]), {"pretrained": str(Path(v["pretrained"]).resolve())}
    import torch

    torch.manual_seed(args.seed)
    model = api.build(v["model"], checkpoint=v["checkpoint"], **overrides)
    if not v["checkpoint"]:
        print(f"itmzoo index: note: no --{prefix}checkpoint, indexing with random weights of '{v['model']}' "
              "(the index keeps a copy of the model)", file=sys.stderr)
        return model, None
    return model, {"name": v["model"], "checkpoint": str(Path(v["checkpoint"]).resolve()), "overrides": overrides}


FIRST = "first-stage-"


def _check_first_stage_args(args: argparse.Namespace) -> bool:
    """Whether a first stage is asked for; one clear error for a doubled, partial or unsavable one."""
    v = _model_flags(args, FIRST)
    if not any(v.values()):
        return False
    _check_model_args(args, FIRST)
    if v["model"] and not v["checkpoint"]:
        raise ValueError(f"--{FIRST}model {v['model']} needs --{FIRST}checkpoint FILE: the index records where "
                         "its first stage comes from, and random weights could not be rebuilt")
    if args.model and not args.checkpoint:
        raise ValueError(f"--model {args.model} without --checkpoint (random weights) cannot take a first stage: "
                         "the index records where both models come from; give --checkpoint FILE or --pretrained DIR")
    return True


def _check_first_stage_fits(args: argparse.Namespace, model: Any, first: Any = None) -> None:
    """The Retriever's own checks on a first stage, worded with the command line's flags: the model must
    score by ``cross`` (checked before the first stage is built) and `first` must be an embedding model
    taking the model's input kind."""
    v = _model_flags(args, FIRST)
    given = f"--{FIRST}pretrained {v['pretrained']}" if v["pretrained"] else f"--{FIRST}model {v['model']}"
    if model.scoring != "cross":
        raise ValueError(f"{given}: a first stage is for cross models; {model.registry_name} scores by "
                         f"{model.scoring!r} and ranks on its own")
    if first is not None and (first.scoring != "embedding" or first.input_kind != model.input_kind):
        raise ValueError(f"{given}: expected an embedding model taking {model.input_kind} (as "
                         f"{model.registry_name} does), got {first.registry_name}, a {first.scoring} model "
                         f"taking {first.input_kind}")


def _read_captions_file(path: str) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    caps = [ln for ln in lines if ln]
    if not caps:
        raise ValueError(f"--captions {path}: no captions (one per line expected)")
    return caps


def _cmd_index(args: argparse.Namespace) -> int:
    import torch

    from .retrieval import Retriever, image_files

    if not (args.images or args.data or args.captions):
        raise ValueError("give a gallery: --images FOLDER, --data SPEC and/or --captions FILE")
    if args.data and (args.images or args.captions):
        raise ValueError("--data gives both images and captions; do not combine it with --images/--captions")
    out = Path(args.out)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose another directory or pass --force to replace it")
    if args.rerank_k is not None and args.rerank_k <= 0:
        raise ValueError(f"--rerank-k: expected a positive number of candidates, got {args.rerank_k}")
    with_first = _check_first_stage_args(args)
    model, source = _model_for(args)
    first = None
    if with_first:
        _check_first_stage_fits(args, model)
        first, first_source = _model_for(args, FIRST)
        _check_first_stage_fits(args, model, first)
        source = {**(source or {}), "first_stage": first_source}
    if args.rerank_k is not None and not (model.scoring == "two-stage" or first is not None):
        raise ValueError(f"--rerank-k re-scores candidates of two-stage models and of cross models with a first "
                         f"stage (--{FIRST}pretrained/--{FIRST}model); {model.registry_name} scores by "
                         f"{model.scoring!r}" + (" and has no first stage" if model.scoring == "cross" else ""))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if first is not None:
        first.to(device).eval()
    progress = not args.quiet and sys.stderr.isatty()
    kw = dict(batch_size=args.batch_size, device=device, progress=progress, backend=args.backend,
              first_stage=first, rerank_k=args.rerank_k)
    extra: dict[str, Any] = {}
    if args.data:
        from .data import load_split

        spec = parse_data_spec(args.data)
        split = load_split(dict(spec))
        retriever = Retriever.from_split(model, split, **kw)
        extra["data"] = spec
    else:
        images = ids = None
        if args.images:
            files = image_files(args.images)
            images, ids = files, [str(f.relative_to(args.images)) for f in files]
            extra["image_root"] = str(Path(args.images).resolve())
        captions = _read_captions_file(args.captions) if args.captions else None
        retriever = Retriever(model, images=images, captions=captions, image_ids=ids, **kw)
    retriever.save(out, model_source=source, extra=extra)
    counts = {w: len(retriever.image_ids or []) if w == "image" else len(retriever.caption_ids or [])
              for w in retriever.features}
    how = (f"{model.scoring}, first stage {first.registry_name}, rerank_k {retriever.rerank_k}" if first is not None
           else f"{model.scoring}, rerank_k {retriever.rerank_k}" if model.scoring == "two-stage"
           else f"{model.scoring}, {retriever.backend}")
    print(f"indexed {', '.join(f'{n} {w}s' for w, n in counts.items())} with {model.registry_name} ({how}) -> {out}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import torch

    from .retrieval import Retriever

    if bool(args.query) == bool(args.image):
        raise ValueError('give one query: a caption ("a red circle") or --image PATH')
    retriever = Retriever.load(args.index, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for m in (retriever.model, retriever.first_stage):
        if m is not None:  # a cross model's first stage encodes the query too
            m.to(retriever.device).eval()
    if args.image:
        res = retriever.search_captions([args.image], k=args.k)
    else:
        res = retriever.search_images([args.query], k=args.k)
    hits = res.to_list()[0]
    if args.json:
        print(json.dumps({"query": args.query or args.image, "direction": "i2t" if args.image else "t2i",
                          "results": hits}, indent=2, default=str))
        return 0
    for h in hits:
        what = h.get("caption", h["id"])
        print(f"{h['rank']:>3}  {h['score']:+.4f}  {what}")
    return 0


def _sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cmd_convert(args: argparse.Namespace) -> int:
    from . import api
    from ._version import __version__

    src = Path(args.official_file)
    if not src.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {src}")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not args.force and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists; choose another directory or pass --force to replace it")
    model = api.build(args.name, checkpoint=src, **_parse_kv(args.set or [], "--set"))
    extra = {"converted_from": str(src.name), "source_sha256": _sha256(src), "converter_itmzoo_version": __version__,
             "name": args.name}
    out = model.save_pretrained(args.out_dir, extra=extra)
    print(f"converted {src} -> {out} ({model.registry_name}); load it with itmzoo.load('{out}')")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_data
    from .data.vocab import SCAN_VOCAB_SHA256

    report = check_data(args.path, vocab=args.vocab, image_root=args.images, known_vocabs=SCAN_VOCAB_SHA256)
    print(f"itmzoo data check {args.path}")
    print(report.text())
    verdict = "usable" if not report.errors else "NOT usable"
    print(f"{verdict}: {report.errors} error(s), {report.warnings} warning(s)")
    return 1 if report.errors else 0


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # --debug also after the command; SUPPRESS keeps the top-level value when it is not repeated
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    p = argparse.ArgumentParser(prog="itmzoo", description="Image-text matching model zoo")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"itmzoo {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", parents=[common], help="list registered models")
    pl.add_argument("pattern", nargs="?", default=None, help="glob, e.g. 'esa*'")
    pl.add_argument("--input-kind", dest="input_kind", choices=["regions", "pixels"])
    pl.add_argument("--scoring", choices=["embedding", "cross", "two-stage"])
    pl.add_argument("--text-backbone", dest="text_backbone")
    pl.add_argument("--has-weights", action="store_true")
    pl.add_argument("--tags", action="store_true", help="list method.tag names")
    pl.add_argument("--names", action="store_true", help="one name per line, no table (for scripts)")
    pl.set_defaults(func=_cmd_list)
    pi = sub.add_parser("info", parents=[common], help="paper, upstream, capabilities and default config of a model")
    pi.add_argument("name")
    pi.add_argument("--json", action="store_true", help="print everything as JSON")
    pi.set_defaults(func=_cmd_info)

    pt = sub.add_parser("train", parents=[common], help="train from a YAML run file (see docs/training.md)",
                        description="Train a model from a run file; writes DIR/config.json, log.jsonl, last/, "
                                    "best/ and metrics.json. Launch with torchrun for several GPUs.")
    pt.add_argument("config", help="YAML run file with model/data/train/eval sections")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.epochs=3 --set model.embed_size=512 (repeatable)")
    pt.add_argument("--out", help="run directory (default: runs/<config name>)")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pt.set_defaults(func=_cmd_train)

    pe = sub.add_parser("eval", parents=[common], help="evaluate a model on a split under a protocol",
                        description="Evaluate a model; launch with torchrun --nproc_per_node=N -m itmzoo.cli eval ... "
                                    "to share encoding and scoring among N processes (rank 0 prints).")
    _add_model_args(pe)
    pe.add_argument("--data", required=True, help="data spec: 'format=synthetic,split=test', an inline YAML "
                                                  "mapping, or a YAML/JSON file")
    pe.add_argument("--protocol", default="full", help="full, 5fold, f30k-1k, coco-1k-5fold, coco-5k")
    pe.add_argument("--out", help="write the metrics JSON here")
    pe.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    pe.add_argument("--amp", choices=["bf16", "fp16"], help="encode under autocast (CUDA)")
    pe.add_argument("--batch-size", dest="batch_size", type=int, default=128, help="images/captions per encode call")
    pe.add_argument("--text-batch-size", dest="text_batch_size", type=int,
                    help="captions per encode call (default: the model's eval settings, else --batch-size)")
    pe.add_argument("--block", type=int, nargs=2, metavar=("IMAGES", "CAPTIONS"),
                    help="pairs per similarity call (default: the model's, else 256 1024); under torchrun the "
                         "ranks share these blocks")
    pe.add_argument("--rerank-k", dest="rerank_k", type=int,
                    help="two-stage models: candidates re-scored per query (default: the model's)")
    pe.add_argument("--pair-batch-size", dest="pair_batch_size", type=int, default=4096,
                    help="two-stage models: second-stage pairs per call")
    pe.add_argument("--seed", type=int, default=0, help="seed of random weights and of random draws while scoring")
    pe.add_argument("--chance", action="store_true", help="also print the recall of a random ranking")
    pe.add_argument("--quiet", action="store_true", help="no progress bars")
    pe.add_argument("--save-sims", dest="save_sims", metavar="FILE.npz",
                    help="write the score matrices [n_images, n_captions] (per direction for two-stage models)")
    pe.add_argument("--save-ranks", dest="save_ranks", metavar="FILE.json",
                    help="write each query's 1-based rank of its ground truth, per direction")
    pe.add_argument("--report", metavar="DIR",
                    help="write an HTML report (metrics, R@K curves, example queries with thumbnails) into DIR")
    pe.set_defaults(func=_cmd_eval)

    px = sub.add_parser("index", parents=[common], help="encode a gallery into an index directory",
                        description="Encode a gallery (a folder of images, a data split and/or a captions file, "
                                    "one caption per line) once; `itmzoo search` then queries it.")
    px.add_argument("out", help="index directory to write (atomically)")
    _add_model_args(px)
    px.add_argument(f"--{FIRST}pretrained", dest="first_stage_pretrained", metavar="DIR",
                    help="cross models: an embedding model (native directory) whose top --rerank-k candidates "
                         "per query the model re-scores, instead of scoring every pair")
    px.add_argument(f"--{FIRST}model", dest="first_stage_model", metavar="NAME",
                    help="cross models: the first stage as a registry name (with --first-stage-checkpoint)")
    px.add_argument(f"--{FIRST}checkpoint", dest="first_stage_checkpoint", metavar="FILE",
                    help="official checkpoint file or native directory for --first-stage-model")
    px.add_argument(f"--{FIRST}set", dest="first_stage_set", action="append", metavar="KEY=VALUE",
                    help="config override of --first-stage-model (repeatable)")
    px.add_argument("--rerank-k", dest="rerank_k", type=int,
                    help="candidates re-scored per query (cross with a first stage, two-stage; default: the "
                         "model's, else 128)")
    px.add_argument("--images", help="folder of pictures (pixel models) or .npy region arrays (region models)")
    px.add_argument("--captions", help="text file, one caption per line")
    px.add_argument("--data", help="a split as for itmzoo eval: 'format=synthetic,split=test', a YAML mapping or file")
    px.add_argument("--backend", choices=["auto", "torch", "faiss"], default="auto",
                    help="embedding models: FAISS index when installed (auto) or exact torch search")
    px.add_argument("--batch-size", dest="batch_size", type=int, help="images/captions per encode call")
    px.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    px.add_argument("--seed", type=int, default=0, help="seed of random weights (no checkpoint)")
    px.add_argument("--force", action="store_true", help="replace an existing index directory")
    px.add_argument("--quiet", action="store_true", help="no progress bars")
    px.set_defaults(func=_cmd_index)

    ps = sub.add_parser("search", parents=[common], help="query an index by text or by image")
    ps.add_argument("index", help="directory written by itmzoo index")
    ps.add_argument("query", nargs="?", help="a caption: finds images")
    ps.add_argument("--image", help="a picture (or .npy region array): finds captions")
    ps.add_argument("-k", type=int, default=5, help="results per query")
    ps.add_argument("--json", action="store_true", help="print the results as JSON")
    ps.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    ps.set_defaults(func=_cmd_search)

    pc = sub.add_parser("convert", parents=[common], help="convert an official checkpoint to a native directory")
    pc.add_argument("name", help="registry name, e.g. lhsc or esa_bigru.f30k")
    pc.add_argument("official_file")
    pc.add_argument("out_dir")
    pc.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="model config override (repeatable), e.g. --set vocab_path=vocab/f30k_precomp_vocab.json "
                         "so that the directory carries the vocabulary")
    pc.add_argument("--force", action="store_true", help="replace an existing out_dir")
    pc.set_defaults(func=_cmd_convert)
    pd = sub.add_parser("data", parents=[common], help="check a downloaded dataset")
    dsub = pd.add_subparsers(dest="data_command", required=True)
    pdc = dsub.add_parser("check", parents=[common], help="counts, dims, caption/image agreement, vocabulary checksum",
                          description="Check a SCAN precomp folder (e.g. data/f30k_precomp), a Karpathy split json "
                                      "or a SCAN vocabulary json; exit status 1 when something is unusable.")
    pdc.add_argument("path", help="precomp folder, dataset_*.json or *_vocab.json")
    pdc.add_argument("--vocab", help="SCAN vocabulary json to check against the captions (default: *vocab*.json "
                                     "in the folder)")
    pdc.add_argument("--images", help="image folder of a Karpathy json (checks that every listed image exists)")
    pdc.set_defaults(func=_cmd_data_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("itmzoo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or repr(e)
        print(f"itmzoo {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
