"""Streaming weight loading by plan: which checkpoint tensor fills which rows of which model tensor.

A ``LoadPlan`` maps every checkpoint key to the model tensors (or rows of them) it fills, and lists the model
tensors that are initialised by a rule instead (a new router gate, new vocabulary rows). ``run_plan`` checks the
whole plan against the checkpoint headers first (missing keys, unexpected keys, shape mismatches, all named,
before a byte of weights is read) and that the plan covers every model tensor (so nothing stays at random
init by accident), then copies tensor by tensor, shard by shard, into the already-built model.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from most_lightning.model.checkpoint.files import CheckpointDir, CheckpointError

log = logging.getLogger(__name__)


@dataclass
class Assign:
    """Write ``take(source)`` into ``target`` (a model state-dict name), at first-dim ``rows`` or whole."""

    target: str
    rows: torch.Tensor | None = None  # long indices along dim 0 of the target; None = the whole tensor
    take: Callable[[torch.Tensor], torch.Tensor] | None = None  # source -> value; None = the source itself


@dataclass
class LoadPlan:
    sources: dict[str, tuple[tuple[int, ...], list[Assign]]] = field(default_factory=dict)  # key -> (shape, assigns)
    # target -> (rows or None, how it is initialised) for model tensors not (fully) taken from the checkpoint
    by_rule: dict[str, tuple[torch.Tensor | None, str]] = field(default_factory=dict)
    rules: list[Callable[[dict[str, torch.Tensor]], None]] = field(default_factory=list)  # run after the copy
    ignore: tuple[str, ...] = ()  # fnmatch patterns of checkpoint keys that carry nothing we need
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, shape: tuple[int, ...], *assigns: Assign) -> None:
        if key in self.sources:
            self.sources[key][1].extend(assigns)
        else:
            self.sources[key] = (tuple(shape), list(assigns))


@dataclass
class LoadReport:
    loaded: int  # checkpoint tensors read
    ignored: list[str]
    initialised_by_rule: dict[str, str]
    seconds: float
    notes: list[str]

    def summary(self) -> str:
        rule = "; ".join(f"{k}: {v}" for k, v in list(self.initialised_by_rule.items())[:4])
        more = len(self.initialised_by_rule) - 4
        rule += f"; ... ({more} more)" if more > 0 else ""
        return (f"{self.loaded} checkpoint tensors loaded in {self.seconds:.1f} s; {len(self.ignored)} ignored"
                + (f"; initialised by rule: {rule}" if self.initialised_by_rule else ""))


def _shown(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent state-dict tensors by name, tied duplicates once (lm_head.weight when tied)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out


def check_plan(plan: LoadPlan, ckpt: CheckpointDir, tensors: dict[str, torch.Tensor]) -> None:
    """Every problem at once, by name: checkpoint keys the plan lacks, keys the checkpoint lacks, shapes, and
    model tensors neither loaded nor initialised by a rule (a bug in the plan, never silently random)."""
    have = ckpt.tensors_info
    unexpected = sorted(k for k in have if k not in plan.sources and not any(fnmatch.fnmatch(k, p) for p in plan.ignore))
    missing = sorted(k for k in plan.sources if k not in have)
    shapes = [f"{k} in {have[k].file.name}: checkpoint {list(have[k].shape)}, model needs {list(shape)}"
              for k, (shape, _) in sorted(plan.sources.items()) if k in have and tuple(have[k].shape) != shape]
    covered: dict[str, torch.Tensor] = {}
    for _, assigns in plan.sources.values():
        for a in assigns:
            if a.target not in tensors:
                raise CheckpointError(f"load plan targets {a.target!r}, which the model does not have (bug)")
            mask = covered.setdefault(a.target, torch.zeros(tensors[a.target].shape[0] if tensors[a.target].dim() else 1,
                                                            dtype=torch.bool))
            mask[a.rows if a.rows is not None else slice(None)] = True
    for target, (rows, _) in plan.by_rule.items():
        mask = covered.setdefault(target, torch.zeros(tensors[target].shape[0] if tensors[target].dim() else 1,
                                                      dtype=torch.bool))
        mask[rows if rows is not None else slice(None)] = True
    uncovered = sorted(n for n in tensors if n not in covered or not bool(covered[n].all()))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint, not used by the model ({len(unexpected)}): {_shown(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:8])
                        + (f"; ... ({len(shapes)} in all)" if len(shapes) > 8 else ""))
    if uncovered:
        problems.append(f"model tensors that nothing would initialise ({len(uncovered)}): {_shown(uncovered)}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: cannot load into this model:\n  - " + "\n  - ".join(problems)
                              + "\nCheck that config.json belongs to these weights and that the model config matches it.")


@torch.no_grad()
def run_plan(plan: LoadPlan, ckpt: CheckpointDir, model: nn.Module, progress: bool = True,
             reader: str = "read") -> LoadReport:
    """Check, then stream the checkpoint into ``model`` in place (dtype converted on copy)."""
    start = time.perf_counter()
    tensors = model_tensors(model)
    check_plan(plan, ckpt, tensors)
    keys = set(plan.sources)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(keys), desc=f"loading {ckpt.path.name}", unit="tensor", leave=False)
        except ImportError:
            pass
    loaded = 0
    for key, source in ckpt.tensors(keys, reader):
        for a in plan.sources[key][1]:
            target = tensors[a.target]
            value = a.take(source) if a.take is not None else source
            if a.rows is None:
                target.copy_(value)
            else:
                target.index_copy_(0, a.rows, value.to(target.dtype))
        loaded += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for rule in plan.rules:
        rule(tensors)
    ignored = sorted(k for k in ckpt.tensors_info if k not in keys)
    report = LoadReport(loaded=loaded, ignored=ignored,
                        initialised_by_rule={k: how for k, (_, how) in plan.by_rule.items()},
                        seconds=time.perf_counter() - start, notes=list(plan.notes))
    log.info(f"{ckpt.path}: {report.summary()}")
    for note in plan.notes:
        log.info(note)
    return report
