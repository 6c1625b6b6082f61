# %% [markdown]
# # Retrieval: search a gallery by text and by image, and see the results
# Train the synthetic demo (or load a run with `--pretrained DIR`), index the test pictures, query by
# text and by image, save the index, and write an HTML report. Runs on CPU in about a minute.
#
#     python examples/retrieve.py [--pretrained runs/demo/best] [--out runs/retrieve_demo]

# %%
import argparse
from pathlib import Path

import torch

import itmzoo
from itmzoo.data import SyntheticShapes
from itmzoo.eval.html import write_report

ap = argparse.ArgumentParser()
ap.add_argument("--pretrained", help="a native model directory (e.g. DIR/best of an itmzoo train run)")
ap.add_argument("--out", default="runs/retrieve_demo", help="where the index and the report go")
args, _ = ap.parse_known_args()
out = Path(args.out)
torch.manual_seed(0)

# %% [markdown]
# ## A model: load one, or train the toy demo for a few epochs

# %%
data = SyntheticShapes({"train": 1000, "dev": 100, "test": 100}, region_dim=256, seed=0)
test = data.split("test")
if args.pretrained:
    model = itmzoo.load(args.pretrained)
else:
    from itmzoo.train import fit

    model = itmzoo.build("toy_vse", img_dim=256, embed_size=128, word_dim=128, warmup_epochs=3)
    fit(model, data.split("train"), {"epochs": 3, "batch_size": 128, "lr": 2e-3, "progress": False})
model.eval()

# %% [markdown]
# ## Index the test images and captions once, then query
# Raw inputs go in: region arrays here (pictures, paths or arrays for pixel models), caption strings.

# %%
gallery = itmzoo.Retriever.from_split(model, test)
print(gallery)
for hit in gallery.search_images("a large red circle", k=5).to_list()[0]:
    objects = "; ".join(o.describe() for o in data.scene("test", hit["index"]))
    print(f"  {hit['rank']}. {hit['id']}  score {hit['score']:.3f}  ({objects})")

print("image 0 shows:", "; ".join(o.describe() for o in data.scene("test", 0)))
for hit in gallery.search_captions([test.images[0]], k=3).to_list()[0]:
    mark = "ok" if test.caption_to_image[hit["index"]] == 0 else "other image"
    print(f"  {hit['rank']}. {hit['caption']!r}  ({mark})")

# %% [markdown]
# ## Save the index (embeddings, ids, the model) and open it again; `itmzoo search DIR "..."` reads it too

# %%
gallery.save(out / "index")
again = itmzoo.Retriever.load(out / "index")
assert again.search_images("a large red circle", k=5).ids == gallery.search_images("a large red circle", k=5).ids
print(f"index saved in {out / 'index'}; try: itmzoo search {out / 'index'} \"a small green triangle\"")

# %% [markdown]
# ## The HTML report: metrics, R@K curves, example queries with thumbnails (rendered scenes)

# %%
metrics = itmzoo.evaluate(model, test, progress=False, return_sims=True)
page = write_report(out / "report", metrics, test, metrics.pop("sims"))
print(f"report: {page}")
