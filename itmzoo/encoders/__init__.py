"""Shared image and text encoders (imported lazily by the model modules that use them).

* `regions`: precomputed region features (VSE-infinity's fc + MLP).
* `gru`: word embedding + BiGRU over a SCAN vocabulary, and a local GloVe reader.
* `hf_text`: BERT / RoBERTa built offline from a config dict, pretrained weights only when asked.
"""
