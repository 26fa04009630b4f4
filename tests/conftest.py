"""Shared fixtures: a fast composed run config (tiny model, tiny corpus, a few steps) and a toy tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from most_lightning.config_nodes import register_config_nodes

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
if str(REPO_ROOT) not in sys.path:  # run.py lives at the repository root
    sys.path.insert(0, str(REPO_ROOT))

# Parametrize a test over these to run it on the CPU and, where one is present, on a CUDA GPU too.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs a CUDA GPU")])]

# Overrides that make an end-to-end run take seconds: tiny corpus, narrow model, few steps, small evals.
FAST_OVERRIDES = [
    "debug=fast",
    "data=tiny",
    "model=tiny",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "callbacks.rich_progress_bar=null",
]


def compose_run_config(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """The run config as `python run.py <overrides>` would see it (hydra section included)."""
    register_config_nodes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides, return_hydra_config=True)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.log_dir = str(tmp_path / "logs")
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as in a real run
    return cfg


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny corpus for the whole session (its first build is the slow part of an end-to-end run). The same
    directory and recipe (conf/data/tiny.yaml == most_lightning.data.testing.TINY_RECIPE) as the data tests."""
    return tmp_path_factory.getbasetemp() / "most_data_corpus"


@pytest.fixture
def single_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny models run fastest on one thread, and a busy machine slows two-thread OpenMP runs a lot."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for subprocesses and spawned workers
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg_fast(tmp_path: Path, shared_data_dir: Path, single_thread) -> DictConfig:
    cfg = compose_run_config([*FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}"], tmp_path)
    yield cfg
    GlobalHydra.instance().clear()


class ToyTokenizer:
    """Stand-in with the MoSTTokenizer interface: 20 text ids (letters), 10 unit ids, specials at the end."""

    n_text, n_units = 20, 10
    vocab_size = n_text + n_units + 4
    boa_id, eoa_id = n_text + n_units, n_text + n_units + 1
    bos_id, eos_id = n_text + n_units + 2, n_text + n_units + 3
    pad_id = eos_id

    def encode_text(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text if "a" <= c < chr(ord("a") + self.n_text)]

    def decode_text(self, ids) -> str:
        return "".join(chr(ord("a") + i) for i in ids if 0 <= i < self.n_text)

    def encode_units(self, units: list[int]) -> list[int]:
        return [self.boa_id, *(self.n_text + u for u in units), self.eoa_id]

    def decode_units(self, ids) -> list[int]:
        return [i - self.n_text for i in ids if self.n_text <= i < self.n_text + self.n_units]

    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        return ((ids >= self.n_text) & (ids <= self.eoa_id)).long()


@pytest.fixture
def toy_tokenizer() -> ToyTokenizer:
    return ToyTokenizer()
