"""Phone-classifier units: a small frame classifier fitted on the training audio's phone alignments.

K-means over MFCC frames splits every phone by voice, pitch and neighbours (demo corpus: PNMI 0.71, 55 units per
2.5 s utterance, dedup removes 11%), and a 5M-parameter decoder does not learn to read such units within a CPU
budget (docs/learning_check.md). Where the corpus has phone alignments (flite gives them; real corpora get them
from forced alignment), a frame classifier over a few frames of context gives about one unit per phone instead.
Units are the Viterbi path through its frame posteriors with a cost per phone change (`switch_penalty`): plain
argmax flickers at phone boundaries, and every flicker survives dedup as an inserted unit
(experiments/phone_frontend_study.py). Same interface as `KMeansQuantizer`: [frames, dim] features -> unit ids,
where the id of a phone is its index in the sorted phone inventory seen in training.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .quantizer import QuantizerFileError


class _FrameMLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, n_out: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, n_out))


def stack_context(features: torch.Tensor, context: int) -> torch.Tensor:
    """[frames, dim] -> [frames, (2 context + 1) dim]: each frame with `context` neighbours on both sides
    (edge frames repeated)."""
    if context == 0:
        return features
    padded = F.pad(features.T.unsqueeze(0), (context, context), mode="replicate")[0].T
    n = features.shape[0]
    return torch.cat([padded[i : i + n] for i in range(2 * context + 1)], dim=1)


class PhoneClassifierQuantizer:
    """Frame features -> the most likely phone's id, by an MLP over `context` frames either side."""

    kind = "phone_classifier"
    source: str = "<fitted>"

    def __init__(self, net: _FrameMLP, phones: Sequence[str], context: int, mean: torch.Tensor, std: torch.Tensor,
                 switch_penalty: float = 0.0):
        _check_switch_penalty(switch_penalty)
        self.net = net.eval()
        self.phones = list(phones)
        self.context = context
        self.mean, self.std = mean.float(), std.float()
        self.switch_penalty = float(switch_penalty)

    @property
    def n_units(self) -> int:
        return len(self.phones)

    @property
    def dim(self) -> int:
        return self.mean.shape[0] // (2 * self.context + 1)

    @classmethod
    def fit(
        cls,
        features: Sequence[torch.Tensor],
        frame_labels: Sequence[Sequence[str]],
        context: int = 5,
        hidden: int = 512,
        epochs: int = 6,
        lr: float = 2e-3,
        batch_size: int = 1024,
        seed: int = 0,
        min_steps: int = 300,
        switch_penalty: float = 0.0,
        on_epoch: Callable[[int, int], None] | None = None,
    ) -> "PhoneClassifierQuantizer":
        """Fit on utterances' [frames, dim] features and their per-frame phone labels (same lengths), for
        `epochs` passes but at least `min_steps` batches (small corpora). switch_penalty > 0 decodes the Viterbi
        path that pays that log-probability per phone change (`best_phone_path`). on_epoch(done, total) reports
        progress."""
        _check_switch_penalty(switch_penalty)  # before the fit, not after
        if len(features) != len(frame_labels) or not features:
            raise ValueError(f"need matching, non-empty features and labels, got {len(features)} and "
                             f"{len(frame_labels)} utterances")
        for i, (f, lab) in enumerate(zip(features, frame_labels)):
            if f.shape[0] != len(lab):
                raise ValueError(f"utterance {i}: {f.shape[0]} feature frames but {len(lab)} phone labels")
        phones = sorted({p for lab in frame_labels for p in lab})
        if len(phones) < 2:
            raise ValueError(f"a phone classifier needs at least 2 phones in the alignments, found {phones}")
        index = {p: i for i, p in enumerate(phones)}
        x = torch.cat([stack_context(f.float(), context) for f in features])
        y = torch.tensor([index[p] for lab in frame_labels for p in lab])
        mean, std = x.mean(0), x.std(0).clamp_min(1e-5)
        x.sub_(mean).div_(std)  # in place: at 50 Hz the stacked train frames are several GB
        with _seeded(seed) as gen:
            net = _FrameMLP(x.shape[1], hidden, len(phones))
            steps_per_epoch = max(len(x) // batch_size, 1)
            epochs = max(epochs, -(-min_steps // steps_per_epoch))
            opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
            for epoch in range(epochs):
                order = torch.randperm(len(x), generator=gen)
                for step in range(steps_per_epoch):
                    idx = order[step * batch_size : (step + 1) * batch_size]
                    loss = F.cross_entropy(net(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                if on_epoch is not None:
                    on_epoch(epoch + 1, epochs)
        return cls(net, phones, context, mean, std, switch_penalty)

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """[frames, dim] -> LongTensor [frames] of phone ids."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [frames, {self.dim}], got {tuple(features.shape)}")
        x = (stack_context(features.float(), self.context) - self.mean) / self.std
        log_probs = F.log_softmax(self.net(x), dim=1)
        return best_phone_path(log_probs, self.switch_penalty) if self.switch_penalty else log_probs.argmax(dim=1)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        tensors.update(mean=self.mean, std=self.std)
        hidden = self.net[0].out_features
        save_file(tensors, os.fspath(path), metadata={"kind": self.kind, "phones": json.dumps(self.phones),
                                                      "context": str(self.context), "hidden": str(hidden),
                                                      "switch_penalty": repr(self.switch_penalty)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PhoneClassifierQuantizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise QuantizerFileError(path, "no such file")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != cls.kind:
            raise QuantizerFileError(path, f"not a phone classifier (metadata kind={meta.get('kind')!r}); expected a "
                                     "file written by PhoneClassifierQuantizer.save")
        tensors = load_file(path)
        phones = json.loads(meta["phones"])
        net = _FrameMLP(tensors["mean"].shape[0], int(meta["hidden"]), len(phones))
        net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")})
        quantizer = cls(net, phones, int(meta["context"]), tensors["mean"], tensors["std"],
                        float(meta.get("switch_penalty", 0.0)))  # files written before the Viterbi decoding: argmax
        quantizer.source = path
        return quantizer


def _check_switch_penalty(value: float) -> None:
    if value < 0:
        raise ValueError(f"switch_penalty must be >= 0 (a log-probability cost per phone change), got {value}")


def best_phone_path(log_probs: torch.Tensor, switch_penalty: float) -> torch.Tensor:
    """Viterbi path through [frames, phones] log-probabilities where every change of phone costs switch_penalty:
    the per-frame argmax without one- or two-frame flickers at phone boundaries (which dedup would keep as
    inserted units)."""
    n_frames, _ = log_probs.shape
    if n_frames == 0:
        return torch.empty(0, dtype=torch.long)
    score = log_probs[0].clone()
    came_from = torch.empty(log_probs.shape, dtype=torch.long)
    for t in range(1, n_frames):
        best = int(score.argmax())
        switch = score[best] - switch_penalty
        stay = score >= switch
        came_from[t] = torch.where(stay, torch.arange(score.shape[0]), best)
        score = torch.where(stay, score, switch) + log_probs[t]
    path = torch.empty(n_frames, dtype=torch.long)
    path[-1] = score.argmax()
    for t in range(n_frames - 1, 0, -1):
        path[t - 1] = came_from[t, path[t]]
    return path


@contextlib.contextmanager
def _seeded(seed: int):
    """Deterministic init and batch order without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)
