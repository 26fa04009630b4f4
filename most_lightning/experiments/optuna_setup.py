"""Storage, sampler and pruner from the sweeper's yaml (hydra.sweeper.{storage,sampler,pruner,directions}).

storage: null (in memory: nothing survives the process), an RDB URL (sqlite:///path.db, postgresql://...) or
journal:///path/to/study.log (Optuna's JournalFileBackend: an append-only file, safe for several processes).
sampler: {name: tpe|cmaes|gp|random|qmc|nsgaii, seed: int, kwargs: {...}}
pruner:  {name: median|hyperband|percentile|successive_halving|none, kwargs: {...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

SAMPLERS = ("tpe", "cmaes", "gp", "random", "qmc", "nsgaii")
PRUNERS = ("none", "median", "hyperband", "percentile", "successive_halving")
DIRECTIONS = ("minimize", "maximize")
JOURNAL_PREFIX = "journal:///"


class SweeperConfigError(ValueError):
    """A sweeper setting that cannot work (unknown sampler, unreachable storage, ...)."""


def _spec(spec: Mapping[str, Any] | str | None, what: str, default: str) -> tuple[str, dict[str, Any]]:
    if spec is None:
        return default, {}
    if isinstance(spec, str):
        return spec.lower(), {}
    spec = dict(spec)
    name = str(spec.pop("name", default)).lower()
    kwargs = dict(spec.pop("kwargs", None) or {})
    if "seed" in spec:
        kwargs["seed"] = spec.pop("seed")
    if spec:
        raise SweeperConfigError(f"hydra.sweeper.{what} has unknown keys {sorted(spec)}; use name, seed, kwargs")
    return name, kwargs


def check_directions(directions: Any) -> list[str]:
    directions = [directions] if isinstance(directions, str) else list(directions or [])
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise SweeperConfigError(f"hydra.sweeper.directions={directions}: give a list of {list(DIRECTIONS)}, one per "
                                 "objective (the task returns one value per direction)")
    return directions


def make_sampler(spec: Mapping[str, Any] | str | None, n_objectives: int, seed_offset: int = 0):
    """The sampler; seed_offset shifts a fixed seed so that parallel workers do not propose the same points."""
    import optuna

    name, kwargs = _spec(spec, "sampler", "tpe")
    if kwargs.get("seed") is not None and seed_offset:
        kwargs["seed"] = (int(kwargs["seed"]) + seed_offset) % (2**32)
    if name == "cmaes" and n_objectives > 1:
        raise SweeperConfigError("hydra.sweeper.sampler=cmaes optimises a single objective; use tpe, gp or nsgaii "
                                 "for several directions")
    classes = {
        "tpe": optuna.samplers.TPESampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
        "nsgaii": optuna.samplers.NSGAIISampler,
    }
    if name not in classes:
        raise SweeperConfigError(f"hydra.sweeper.sampler.name={name!r}: allowed samplers are {list(SAMPLERS)}")
    try:
        return classes[name](**kwargs)
    except (TypeError, ImportError, ModuleNotFoundError) as err:
        raise SweeperConfigError(f"hydra.sweeper.sampler ({name}, kwargs {kwargs}) could not be built: {err}") from err


def make_pruner(spec: Mapping[str, Any] | str | None, n_objectives: int):
    import optuna

    name, kwargs = _spec(spec, "pruner", "none")
    classes = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }
    if name not in classes:
        raise SweeperConfigError(f"hydra.sweeper.pruner.name={name!r}: allowed pruners are {list(PRUNERS)}")
    if name != "none" and n_objectives > 1:
        raise SweeperConfigError("Optuna cannot prune multi-objective studies: set hydra.sweeper.pruner=none "
                                 "or optimise one direction")
    try:
        return classes[name](**kwargs)
    except TypeError as err:
        raise SweeperConfigError(f"hydra.sweeper.pruner ({name}, kwargs {kwargs}) could not be built: {err}") from err


def make_storage(url: str | None):
    """None (in memory), an RDBStorage or a JournalStorage; raise naming the URL if it cannot be opened."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url is None or str(url) == "":
        return None
    url = str(url)
    try:
        if url.startswith(JOURNAL_PREFIX):
            path = Path(url[len(JOURNAL_PREFIX) - 1:])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("journal:"):
            raise SweeperConfigError(f"hydra.sweeper.storage={url!r}: write journal:///absolute/path/study.log")
        if url.startswith("sqlite:///"):
            db = url[len("sqlite:///"):]
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
        # RDB connections are made lazily: touch the database now so a bad URL fails before any trial runs
        storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        storage.get_all_studies()
        return storage
    except SweeperConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - every backend has its own errors; all mean "cannot open"
        raise SweeperConfigError(
            f"hydra.sweeper.storage={url!r} could not be opened: {type(err).__name__}: {err}. Use "
            "sqlite:///path/study.db, journal:///path/study.log, or an RDB URL that this machine can reach."
        ) from err


def _engine_kwargs(url: str) -> dict[str, Any]:
    # several processes write one SQLite file: wait for the lock instead of failing at once
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
