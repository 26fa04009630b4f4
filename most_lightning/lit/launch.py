"""One run directory for all the processes that torchrun or srun started.

Each rank runs `run.py` itself, and Hydra names the run directory from the clock (`${now:...}`), so two ranks
would write two run folders. Before Hydra starts, `pin_run_dir_for_launched_ranks` adds
`hydra.run.dir=<log_dir>/<task_name>/runs/<shared id>` to the command line; the id is the same on every rank:
MOST_RUN_ID if set, else the SLURM job and step ids, else torchrun's rendezvous id (--rdzv-id, or the random
one of --standalone), else, on a single node, the torchrun agent's pid and start time. Ranks other than 0
do not write Hydra's .hydra/ folder and log to run_rank<r>.log. Standard library only: it runs before
anything heavy is imported.
"""

from __future__ import annotations

import os
import sys

MULTIRUN_FLAGS = ("-m", "--multirun")


class LaunchError(SystemExit):
    """Printed as the message, exit status 2 (a SystemExit, so no traceback hides the reason)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


def _world_and_rank(env: dict[str, str]) -> tuple[int, int]:
    world = env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or "1"
    rank = env.get("RANK") or env.get("SLURM_PROCID") or "0"
    return (int(world), int(rank)) if world.isdigit() and rank.isdigit() else (1, 0)


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks after boot
    except (OSError, IndexError):
        return None


def shared_run_id(env: dict[str, str] | None = None) -> str:
    """The id every rank of one launch computes alike (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    if env.get("MOST_RUN_ID"):
        return env["MOST_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    world, _ = _world_and_rank(env)
    local = env.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) == world:  # one node: the ranks share their parent, the torchrun agent
        parent = os.getppid()
        return f"torchrun-{parent}-{_process_start(parent) or 0}"
    raise LaunchError("several nodes and no shared run id: set MOST_RUN_ID=<name> for every rank (or give "
                      "torchrun --rdzv-id), so that all ranks write into one run directory")


def pin_run_dir_for_launched_ranks(argv: list[str], env: dict[str, str] | None = None) -> str | None:
    """Edit ``argv`` (Hydra's command line) in place when an outside launcher started several processes;
    returns the run id used, or None when nothing was changed."""
    env = dict(os.environ if env is None else env)
    world, rank = _world_and_rank(env)
    if world <= 1:
        return None
    if any(arg in MULTIRUN_FLAGS for arg in argv[1:]):
        raise LaunchError(f"a multirun (-m) under a launcher that started {world} processes: every process would "
                          "run the whole sweep. Launch one torchrun/srun job per configuration (docs/scaling.md)")
    if any(arg.startswith(("hydra.run.dir=", "+hydra.run.dir=")) for arg in argv[1:]):
        return None
    run_id = shared_run_id(env)
    argv.append(f"hydra.run.dir=${{paths.log_dir}}/${{task_name}}/runs/{run_id}")
    if rank > 0:
        argv += ["hydra.output_subdir=null", f"hydra.job.name=run_rank{rank}"]
    return run_id


def close_process_group() -> None:
    """Destroy torch.distributed's default process group if this process made one. Left to interpreter
    shutdown, a gloo group can abort a rank that finished its work ("terminate called without an active
    exception", exit status -6), roughly one two-rank CPU DeepSpeed run in ten."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_launched_rank() -> None:
    """End a rank of a multi-process launch (WORLD_SIZE > 1) that finished its work: flush the output and leave
    with status 0 through ``os._exit``, skipping interpreter finalisation. Even with the group destroyed, a finished
    two-rank CPU ZeRO-3 rank aborted there once in CI ("terminate called without an active exception"): Gloo work
    objects still referenced from Python (as DeepSpeed's async all-gathers keep them) are freed while the
    interpreter is torn down. A single process returns and exits normally."""
    world, _ = _world_and_rank(dict(os.environ))
    if world <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
