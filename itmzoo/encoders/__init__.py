"""Shared image and text encoders (imported lazily by the model modules that use them).

* `regions`: precomputed region features (VSE-infinity's fc + MLP).
* `gru`: word embedding + BiGRU over a SCAN vocabulary, and a local GloVe reader.
* `hf_text`: BERT / RoBERTa built offline from a config dict, pretrained weights only when asked.
* `clip`: OpenAI CLIP (ViT image tower, causal text tower) with OpenAI's parameter names.
* `vit`: transformers' ViT (in21k ViT-B/16) built offline; transformers 4.x and 5.x key layouts.
"""
