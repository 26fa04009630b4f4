"""Corpus preparers: native corpus layouts -> WebDataset shards + manifest (see docs/data_preparation.md).

    python -m most_lightning.data.prepare librispeech LibriSpeech/dev-clean --out shards/ls-dev --units unit_extractor
    python -m most_lightning.data.prepare --help

One module per source (plan: index files -> items per split); build.py turns items into samples and writer.py
writes shards in parallel, resumably and deterministically.
"""

SOURCES = ("librispeech", "libriheavy", "commonvoice", "voxpopuli", "text", "chat", "demo_chat")
