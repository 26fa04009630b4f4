"""End-of-audio is what lets TTS stop: it must be a supervised label in every TTS training example, predicted at
the position whose input is the last unit (an audio position), under every batching mode."""

from __future__ import annotations

import pytest
import torch

from most_lightning.data.datamodule import MoSTDataModule
from most_lightning.data.tasks import IGNORE_INDEX
from most_lightning.data.testing import TINY_RECIPE, build_tiny_corpus


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "most_data_corpus"  # the data tests' cache: built once
    build_tiny_corpus(root)
    return root


@pytest.mark.parametrize("batching", [dict(batching="fixed"), dict(batching="bucket", max_tokens=400),
                                      dict(batching="pack", max_length=256, max_tokens=512)])
def test_every_tts_training_example_supervises_end_of_audio(data_root, batching):
    kw = dict(max_length=None) | batching
    dm = MoSTDataModule.from_settings(data_dir=str(data_root), corpus=TINY_RECIPE, progress=False, batch_size=4,
                                      task_weights={"tts": 1.0}, **kw)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    n_examples = 0
    for batch in dm.train_dataloader():
        ids, labels, modality = batch["input_ids"], batch["labels"], batch["modality"]
        for row in range(ids.shape[0]):
            ends = (labels[row] == tok.eoa_id).nonzero().flatten().tolist()
            starts = (labels[row] == tok.boa_id).nonzero().flatten().tolist()
            # one supervised end-of-audio per supervised begin-of-audio (a packed row holds several examples)
            assert len(ends) == len(starts) >= 1, (batching, row)
            for end in ends:
                assert labels[row, end] != IGNORE_INDEX
                # the position that predicts it reads the last unit: an audio position (audio experts under
                # modality-aware routing), itself supervised as a unit
                assert int(modality[row, end - 1]) == 1 and int(ids[row, end - 1]) in set(tok.unit_ids.tolist())
                assert labels[row, end + 1] == tok.eos_id  # and the end of the response follows
            n_examples += len(ends)
    assert n_examples >= 10
