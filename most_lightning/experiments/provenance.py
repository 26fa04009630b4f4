"""What every run leaves beside its metrics: the resolved config and where the code came from."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def git_state(root: str | Path) -> dict[str, Any]:
    """{"commit", "dirty"} of the repository at root (commit None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def run_provenance(root: str | Path) -> dict[str, Any]:
    return {"git": git_state(root), "argv": sys.argv, "host": socket.gethostname(), "pid": os.getpid(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def job_config(cfg: DictConfig) -> DictConfig:
    """The run's config without Hydra's own node (present when composed with return_hydra_config)."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])


def write_run_records(output_dir: Path, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """config_resolved.yaml, metrics.json and provenance.json (git commit, command line) in the run dir."""
    from most_lightning.lit.runtime import write_json

    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(job_config(cfg), output_dir / "config_resolved.yaml", resolve=True)
    write_json(output_dir / "metrics.json", metrics)
    root = cfg.paths.get("root_dir") if "paths" in cfg else None
    (output_dir / "provenance.json").write_text(json.dumps(run_provenance(root or "."), indent=2) + "\n")
