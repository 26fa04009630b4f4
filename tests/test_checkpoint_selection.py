"""The rule that picks the checkpoint `test_weights=best` tests: the checkpoint written at the end of the validation
with the lowest val/nll, holding exactly the weights that validation measured (most_lightning/lit/checkpointing.py).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import open_dict

from conftest import compose_run_config
from most_lightning.lit.runtime import checkpoint_for_test, instantiate_callbacks

VAL_NLL = {5: 3.0, 10: 1.0, 15: 2.0, 20: 2.5}  # by the step a validation runs at: best at step 10


class Toy(L.LightningModule):
    """A linear layer trained on noise; its validation reports the scripted val/nll of the current step and keeps
    a copy of the weights it measured."""

    def __init__(self, n_train: int):
        super().__init__()
        self.n_train = n_train
        self.layer = torch.nn.Linear(4, 1)
        self.validated: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.validated[self.global_step] = self.layer.weight.detach().clone()
        self.log("val/nll", VAL_NLL[self.global_step])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(self.n_train, 4)), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 4)), batch_size=2)


def fit(callback, tmp_path, n_train: int = 64) -> tuple[L.Trainer, Toy]:
    """20 steps, a validation every 5; n_train=12: 6 batches per epoch, so epoch ends fall between validations."""
    torch.manual_seed(0)
    model = Toy(n_train)
    trainer = L.Trainer(max_steps=20, val_check_interval=5, check_val_every_n_epoch=None, callbacks=[callback],
                        logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model)
    return trainer, model


def best_for_test(trainer) -> dict:
    return torch.load(checkpoint_for_test(trainer, "best"), weights_only=True)


def configured_checkpoint(tmp_path, **overrides):
    """The run's own model_checkpoint callback (conf/callbacks/model_checkpoint.yaml) with these settings."""
    cfg = compose_run_config(["callbacks=default"], tmp_path)
    with open_dict(cfg):
        cfg.callbacks = {"model_checkpoint": cfg.callbacks.model_checkpoint}
        cfg.callbacks.model_checkpoint.dirpath = str(tmp_path / "checkpoints")
        cfg.callbacks.model_checkpoint.update(overrides)
    # the group's one callback; instantiate_callbacks adds ValidateAtEnd to every run's callbacks
    (callback,) = [c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, ModelCheckpoint)]
    return callback


def test_plain_model_checkpoint_with_every_n_train_steps_marks_the_wrong_checkpoint_best(tmp_path):
    """The defect, reproduced with Lightning's ModelCheckpoint: saves between validations are scored with the
    previous validation's val/nll, so "best" holds later weights than the ones that scored best."""
    callback = ModelCheckpoint(dirpath=tmp_path / "ck", filename="step_{step:06d}", monitor="val/nll",
                               save_top_k=1, save_last=True, every_n_train_steps=3)
    trainer, model = fit(callback, tmp_path)
    assert best_for_test(trainer)["global_step"] != 10


@pytest.mark.parametrize("n_train", [64, 12])
@pytest.mark.parametrize("every_n_train_steps", [None, 1, 3, 5, 7])
def test_best_is_the_checkpoint_of_the_best_validation(tmp_path, every_n_train_steps, n_train):
    callback = configured_checkpoint(tmp_path, every_n_train_steps=every_n_train_steps)
    trainer, model = fit(callback, tmp_path, n_train)
    best_step = min(model.validated, key=lambda step: VAL_NLL[step])
    ckpt = best_for_test(trainer)
    assert best_step == 10 and ckpt["global_step"] == best_step
    assert torch.equal(ckpt["state_dict"]["layer.weight"], model.validated[best_step])
    assert float(callback.best_model_score) == VAL_NLL[best_step]
    last = torch.load(callback.last_model_path, weights_only=True)
    assert last["global_step"] == 20  # last.ckpt still follows training (what a crashed run resumes from)
