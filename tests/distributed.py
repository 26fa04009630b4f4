"""Start N CPU ranks of a script the way torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, ... in the environment),
on a free port, with a timeout; every process is killed on the way out, whatever happened."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, run_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               GROUP_RANK="0", ROLE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               TORCHELASTIC_RUN_ID=run_id, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def launch(args: list[str], world: int, timeout: float, cwd: Path | None = None,
           extra_env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run `python <args>` as ranks 0..world-1; returns each rank's CompletedProcess (stdout+stderr merged).
    Raises TimeoutError naming the ranks still alive after `timeout` seconds (after killing them)."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    procs, logs = [], []
    try:
        for rank in range(world):
            env = rank_env(rank, world, port, run_id) | (extra_env or {})
            log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"most_rank{rank}_{run_id}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=cwd or REPO, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(procs) if p.poll() is None]
                raise TimeoutError(f"ranks {alive} still running after {timeout:.0f} s: " + _tails(logs))
            if any(p.poll() not in (None, 0) for p in procs):  # one rank failed: the others would wait forever
                time.sleep(3)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, log.read(), ""))
        log.close()
        os.unlink(log.name)
    return results


def _tails(logs) -> str:
    out = []
    for rank, log in enumerate(logs):
        log.flush()
        log.seek(0)
        out.append(f"--- rank {rank}:\n" + log.read()[-3000:])
    return "\n".join(out)
