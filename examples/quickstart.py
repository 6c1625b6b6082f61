# %% [markdown]
# # itmzoo quickstart
# Build a model, encode images and captions, score them, evaluate recall, train briefly and retrieve.
# Everything runs on the built-in synthetic data (nothing downloaded), on CPU.
# Run it as a script (`python examples/quickstart.py`) or cell by cell (`# %%` markers).

# %%
import numpy as np
import torch

import itmzoo
from itmzoo.data import SyntheticShapes
from itmzoo.data.collate import collate_images
from itmzoo.eval import chance_metrics, encode_split, format_metrics, similarity_matrix
from itmzoo.train import fit

print(itmzoo.list_models())  # every registered method
torch.manual_seed(0)

# %% [markdown]
# ## Data: SyntheticShapes
# Scenes of coloured shapes; each image has 36 region features (like BUTD boxes) and 5 captions.

# %%
data = SyntheticShapes({"train": 1000, "dev": 100, "test": 100}, region_dim=256, seed=0)
train, dev, test = data.split("train"), data.split("dev"), data.split("test")
print(test)
print(test.captions[:5])  # the 5 captions of test image 0

# %% [markdown]
# ## Build a model
# `toy_vse` is a tiny embedding model (mean-pooled regions, hashed bag of words). Overrides are
# validated against its typed config; the model carries its own tokenizer and image transform.

# %%
model = itmzoo.build("toy_vse", img_dim=256, embed_size=128, word_dim=128, warmup_epochs=3)
print(model.config)

# %% [markdown]
# ## Encode and score
# A batch is a dict: region features + lengths for images, token ids + masks for captions.

# %%
images = collate_images([model.image_transform(test.images[i]) for i in range(3)], model.input_kind)
texts = model.tokenizer(test.captions[:15])
model.eval()
with torch.no_grad():
    img_emb = model.encode_image(images)  # [3, 128]
    txt_emb = model.encode_text(texts)  # [15, 128]
    scores = model.similarity(img_emb, txt_emb)  # [3 images, 15 captions]
print(img_emb.shape, txt_emb.shape, scores.shape)

# %% [markdown]
# ## Evaluate: random weights score at chance level

# %%
before = itmzoo.evaluate(model, test, protocol="full", progress=False)
print("untrained:", format_metrics(before))
print("chance:   ", format_metrics(chance_metrics(test.caption_to_image)))

# %% [markdown]
# ## Train for a few epochs
# `fit` runs the shared training loop. `toy_vse` sums the hinge loss over all negatives for its first
# `warmup_epochs` epochs (3 here, so all of this short run) and then switches to the hardest
# negative (VSE++), which from scratch needs the warm-up.

# %%
result = fit(model, train, {"epochs": 3, "batch_size": 128, "lr": 2e-3, "progress": False}, dev)
after = itmzoo.evaluate(model, test, protocol="full", progress=False)
print("trained:  ", format_metrics(after))

# %% [markdown]
# ## Retrieve: the top captions of one image

# %%
with torch.no_grad():
    img_feats, txt_feats = encode_split(model, test, progress=False)
    sims = similarity_matrix(model, img_feats[:1], txt_feats, progress=False)[0]
top = torch.topk(sims, 3).indices.tolist()
print("image 0 is described as:", "; ".join(test.captions[:2]), "...")
for j in top:
    mark = "ok" if test.caption_to_image[j] == 0 else f"image {test.caption_to_image[j]}"
    print(f"  {sims[j]:.3f}  {test.captions[j]!r}  ({mark})")

# %% [markdown]
# ## Save and load (config.json + model.safetensors)

# %%
import tempfile  # noqa: E402

with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    again = itmzoo.load(d)
    assert np.isclose(itmzoo.evaluate(again, test, progress=False)["rsum"], after["rsum"])
print("saved, loaded, same recall")
