"""Resume after a crash: `python run.py ckpt_path=<run>/checkpoints/last.ckpt` or `python run.py resume=<run>`.

A resumed training run continues in the killed run's directory, so that directory gets its metrics.json, its
checkpoint callback finds its own checkpoints (Lightning restores the best-checkpoint tracking only when the
checkpoint directory is the same) and its logs continue. Before Hydra composes the config, `resume_argv` turns
the command line into:

    <the killed run's overrides (.hydra/overrides.yaml) not given again> + <this command line>
    + ckpt_path=<run>/checkpoints/last.ckpt (for resume=) + hydra.run.dir=<run>

so the resumed run trains the same model on the same data. Only for training (not mode=eval, not a multirun)
and only when the checkpoint lies in `<run>/checkpoints/` of a run directory Hydra wrote (`<run>/.hydra/`).
The data position comes from the checkpoint (MoSTDataModule.state_dict).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..checkpoint_safety import local_checkpoint_path

LAST = "last.ckpt"


def run_dir_of_checkpoint(ckpt: str | os.PathLike) -> Path | None:
    """The run directory holding `ckpt` as <run>/checkpoints/<file>, if Hydra wrote that run (<run>/.hydra)."""
    path = Path(ckpt).expanduser().resolve()
    if path.parent.name == "checkpoints" and (path.parent.parent / ".hydra").is_dir():
        return path.parent.parent
    return None


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _value(args: Sequence[str], key: str) -> str | None:
    for arg in args:
        if "=" in arg and _key(arg) == key:
            return arg.split("=", 1)[1]
    return None


def _force_add(arg: str) -> str:
    return "+" + arg if arg.startswith("+") and not arg.startswith("++") else arg


def resume_argv(argv: Sequence[str]) -> list[str]:
    """The command line (without the program name) a resumed run is composed from; unchanged for other runs."""
    args = list(argv)
    for key in ("ckpt_path", "resume"):  # any mode, multiruns too: a URL is refused before anything starts
        if _value(args, key):
            local_checkpoint_path(_value(args, key), key)
    if any(a in ("-m", "--multirun") or a.startswith("-") for a in args):  # multiruns, --cfg, --help: as given
        return args
    mode = _value(args, "mode")
    if mode not in (None, "train"):
        return args
    resume, ckpt = _value(args, "resume"), _value(args, "ckpt_path")
    if resume not in (None, "", "null"):
        run_dir = Path(local_checkpoint_path(resume, "resume")).expanduser().resolve()
        if not (run_dir / "checkpoints" / LAST).exists():  # a file, or a sharded DeepSpeed checkpoint's folder
            raise FileNotFoundError(f"resume={resume}: no {run_dir / 'checkpoints' / LAST} (a run directory of "
                                    "python run.py with callbacks.model_checkpoint.save_last=true)")
        ckpt = str(run_dir / "checkpoints" / LAST)
        args = [a for a in args if _key(a) not in ("resume", "ckpt_path")] + [f"ckpt_path={ckpt}"]
    if ckpt in (None, "", "null"):
        return args
    run_dir = run_dir_of_checkpoint(local_checkpoint_path(ckpt))
    if run_dir is None or _value(args, "hydra.run.dir") is not None:
        return args
    given = {_key(a) for a in args}
    earlier = []
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        from omegaconf import OmegaConf

        # an addition (+key=...) is replayed as ++key=..., which also sets a key the config has gained since
        earlier = [_force_add(str(o)) for o in OmegaConf.load(overrides)
                   if _key(str(o)) not in given | {"ckpt_path", "resume", "hydra.run.dir"}]
    return earlier + args + [f"hydra.run.dir={run_dir}"]


def checkpoint_to_resume(cfg) -> str | None:
    """ckpt_path of a training run as a local path (URLs refused); resume=<run dir> means its last.ckpt."""
    ckpt, resume = cfg.get("ckpt_path"), cfg.get("resume")
    if resume and not ckpt:
        ckpt = str(Path(local_checkpoint_path(resume, "resume")) / "checkpoints" / LAST)
    if not ckpt:
        return None
    ckpt = local_checkpoint_path(ckpt)
    if ckpt not in ("last", "best", "hpc", "registry") and not Path(ckpt).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt}: no such file or sharded checkpoint folder")
    return ckpt
