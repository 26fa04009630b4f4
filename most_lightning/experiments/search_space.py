"""Search spaces declared in yaml (hydra.sweeper.search_space) and sampled define-by-run on an Optuna trial.

    search_space:
      model.audio_expert_fraction: {type: float, low: 0.25, high: 0.75}
      lit.optimizer.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      model.top_k: {type: int, low: 1, high: 3}
      router: {type: categorical, choices: [vanilla, modality_aware]}
      router.mask: {type: categorical, choices: [probs, logits], when: {router: modality_aware}}

`key: null` removes a parameter that an inherited yaml declared. Each key is a Hydra override key (a config value such as `model.top_k` or a config group such as `router`);
a sampled point becomes the overrides `key=value`. `when` makes a parameter conditional on earlier ones (the
order in the yaml): it is sampled only when every named parameter took one of the listed values, which is how
Optuna's define-by-run spaces express conditionals (TPE handles them; CMA-ES/GP sample them independently).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("float", "int", "categorical")


class SearchSpaceError(ValueError):
    """A search space that cannot be sampled (bad type, empty range, unknown condition)."""


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)

    def distribution(self):
        import optuna.distributions as d

        if self.kind == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return d.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return d.CategoricalDistribution(self.choices)

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def random_value(self, rng: random.Random) -> Any:
        if self.kind == "categorical":
            return rng.choice(self.choices)
        if self.kind == "int":
            step = self.step or 1
            return self.low + step * rng.randint(0, (self.high - self.low) // step)
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def corners(self) -> list[Any]:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(key in values and values[key] in allowed for key, allowed in self.when.items())


def parse_search_space(spec: Mapping[str, Any] | None) -> list[Param]:
    """Validate the yaml mapping key -> {type, low/high/step/log | choices, when}; raise naming the key."""
    params: list[Param] = []
    for key, entry in (spec or {}).items():
        where = f"hydra.sweeper.search_space.{key}"
        if entry is None:  # `key: null` drops a parameter inherited from another search-space file
            continue
        if not isinstance(entry, Mapping):
            raise SearchSpaceError(f"{where} must be a mapping like {{type: float, low: 0.1, high: 0.9}}, got {entry!r}")
        entry = dict(entry)
        kind = entry.pop("type", None)
        if kind not in KINDS:
            raise SearchSpaceError(f"{where}.type={kind!r}: allowed types are {list(KINDS)}")
        when = entry.pop("when", None) or {}
        if not isinstance(when, Mapping):
            raise SearchSpaceError(f"{where}.when must map earlier parameters to a value or list of values")
        when = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in when.items()}
        unknown_cond = [k for k in when if k not in {p.key for p in params}]
        if unknown_cond:
            raise SearchSpaceError(f"{where}.when names {unknown_cond}, which are not parameters declared above it")
        if kind == "categorical":
            choices = entry.pop("choices", None)
            if not isinstance(choices, (list, tuple)) or not choices:
                raise SearchSpaceError(f"{where}.choices must be a non-empty list")
            param = Param(key, kind, choices=tuple(choices), when=when)
        else:
            if "low" not in entry or "high" not in entry:
                raise SearchSpaceError(f"{where} needs low and high")
            cast = float if kind == "float" else int
            try:
                low, high = cast(entry.pop("low")), cast(entry.pop("high"))
                step = entry.pop("step", None)
                step = cast(step) if step is not None else None
            except (TypeError, ValueError) as err:
                raise SearchSpaceError(f"{where}: low/high/step must be {kind} numbers ({err})") from None
            log = bool(entry.pop("log", False))
            if low > high or (kind == "float" and low == high):
                raise SearchSpaceError(f"{where}: empty range low={low} high={high}; need low < high")
            if log and low <= 0:
                raise SearchSpaceError(f"{where}: log=true needs low > 0, got low={low}")
            if log and step is not None:
                raise SearchSpaceError(f"{where}: step and log=true cannot be combined (Optuna)")
            if step is not None and step <= 0:
                raise SearchSpaceError(f"{where}: step must be > 0, got {step}")
            param = Param(key, kind, low=low, high=high, step=step, log=log, when=when)
        if entry:
            raise SearchSpaceError(f"{where} has unknown keys {sorted(entry)}")
        params.append(param)
    return params


def suggest(trial, space: list[Param]) -> dict[str, Any]:
    """Sample the active parameters on an Optuna trial (a re-queued trial returns its fixed values)."""
    values: dict[str, Any] = {}
    for param in space:
        if param.active(values):
            values[param.key] = param.suggest(trial)
    return values


def to_overrides(values: Mapping[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in values.items()]


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (floats keep full precision, odd strings quoted)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if text.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum():
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def probe_points(space: list[Param], n_random: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """Points that cover the space for a before-the-study validity check: each parameter's corners/choices
    (others at their first corner) plus seeded random points; conditional parameters follow their conditions."""
    rng = random.Random(seed)
    points: list[dict[str, Any]] = []

    def fill(chosen: dict[str, Any], pick) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for param in space:
            if param.active(values):
                values[param.key] = chosen[param.key] if param.key in chosen else pick(param)
        return values

    for param in space:
        for corner in param.corners():
            points.append(fill({param.key: corner}, lambda p: p.corners()[0]))
    for _ in range(n_random):
        points.append(fill({}, lambda p: p.random_value(rng)))
    return points
