"""Exact resume: the demo corpus's data position, and `python run.py ckpt_path=<run>/checkpoints/last.ckpt` after a
kill -9 at a random step continues in the same run directory with the uninterrupted run's batches and weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST_OVERRIDES, REPO_ROOT, compose_run_config
from most_lightning.data.datamodule import MoSTDataModule
from most_lightning.data.testing import TINY_RECIPE, build_tiny_corpus
from most_lightning.lit.resume import resume_argv


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "most_data_corpus"  # the session's shared tiny corpus
    build_tiny_corpus(root)
    return root


def demo_dm(data_root, **kw) -> MoSTDataModule:
    dm = MoSTDataModule.from_settings(data_dir=str(data_root), corpus=TINY_RECIPE, progress=False, batch_size=3,
                                      max_length=None, **kw)
    dm.setup("fit")
    return dm


def epoch_batches(dm, consume: int | None = None) -> list[dict]:
    """The batches of one pass of the training loader, each handed to the DataModule as Lightning does."""
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        dm.on_before_batch_transfer(batch, 0)
        out.append(batch)
        if consume is not None and i + 1 == consume:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_demo_stream_resumes_at_its_data_position(data_root, num_workers):
    """The demo corpus trains through its default sources, whose data position a resumed run restarts at."""
    reference = epoch_batches(demo_dm(data_root, num_workers=num_workers))
    k = 3  # odd: with 2 workers the resumed epoch must start at worker 1 (rotated)
    first = demo_dm(data_root, num_workers=num_workers)
    before = epoch_batches(first, consume=k)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON-able values
    resumed = demo_dm(data_root, num_workers=num_workers)
    resumed.load_state_dict(state)
    after = epoch_batches(resumed)
    assert [b["key"] for b in before] == [b["key"] for b in reference[:k]]
    assert [b["key"] for b in after] == [b["key"] for b in reference[k:]]
    for b, r in zip(after, reference[k:]):
        assert torch.equal(b["input_ids"], r["input_ids"]) and torch.equal(b["labels"], r["labels"])
    with pytest.raises(ValueError, match="resume_data_position=false"):
        other = demo_dm(data_root, num_workers=2 if num_workers == 0 else 0)  # 0 and 1 are both one reader
        other.load_state_dict(state)
        epoch_batches(other)


def test_resume_argv_continues_in_the_run_directory(tmp_path):
    run = tmp_path / "runs" / "a"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / ".hydra" / "overrides.yaml").write_text("- data=tiny\n- trainer.max_steps=30\n- seed=7\n"
                                                   "- +model.kv_lora_rank=16\n")
    ckpt = str(run / "checkpoints" / "last.ckpt")
    # an old run's addition (+model.kv_lora_rank, from before the model group listed every field) is forced
    assert resume_argv([f"ckpt_path={ckpt}", "trainer.max_steps=40"]) == [
        "data=tiny", "seed=7", "++model.kv_lora_rank=16", f"ckpt_path={ckpt}", "trainer.max_steps=40",
        f"hydra.run.dir={run}"]
    assert resume_argv([f"resume={run}"]) == [
        "data=tiny", "trainer.max_steps=30", "seed=7", "++model.kv_lora_rank=16", f"ckpt_path={ckpt}",
        f"hydra.run.dir={run}"]
    assert compose_run_config(["++model.kv_lora_rank=16"]).model.kv_lora_rank == 16
    # not a run directory's checkpoint, an eval, a multirun: the command line as given
    (tmp_path / "x.ckpt").write_bytes(b"")
    assert resume_argv([f"ckpt_path={tmp_path / 'x.ckpt'}"]) == [f"ckpt_path={tmp_path / 'x.ckpt'}"]
    assert resume_argv(["mode=eval", f"ckpt_path={ckpt}"]) == ["mode=eval", f"ckpt_path={ckpt}"]
    assert resume_argv(["-m", f"ckpt_path={ckpt}"]) == ["-m", f"ckpt_path={ckpt}"]
    with pytest.raises(FileNotFoundError, match="resume=.*last.ckpt"):
        resume_argv([f"resume={tmp_path}"])


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


MAX_STEPS = 14


def _run(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "run.py"), *args], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_matches_the_uninterrupted_run(tmp_path, shared_data_dir):
    build_tiny_corpus(shared_data_dir)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    common = [*FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}", f"trainer.max_steps={MAX_STEPS}",
              "trainer.val_check_interval=5", "trainer.limit_val_batches=1", "data.batches_per_epoch=6",
              "callbacks.model_checkpoint.every_n_train_steps=1", "logger=csv", "test=false",
              "trainer.deterministic=true"]

    def args(name: str) -> list[str]:
        return [*common, f"hydra.run.dir={tmp_path / name}", "+callbacks.keys._target_="
                "most_lightning.data.testing.BatchKeyRecorder", f"+callbacks.keys.path={tmp_path / name}.jsonl"]

    full = _run(args("full"), env)
    out = full.communicate(timeout=600)[0]
    assert full.returncode == 0, out[-3000:]
    reference = {s["step"]: s["keys"] for s in _steps(tmp_path / "full.jsonl")}
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))

    kill_at = random.Random().randrange(2, MAX_STEPS - 1)  # any step: epochs are 6 batches, validations every 5
    print(f"kill -9 after step {kill_at}")
    killed = _run(args("killed"), env, start_new_session=True)
    deadline = time.time() + 600
    while len(_steps(tmp_path / "killed.jsonl")) < kill_at and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    run = tmp_path / "killed"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert not (run / "metrics.json").exists()
    saved_step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 1 <= saved_step < MAX_STEPS

    resumed = _run([f"ckpt_path={ckpt}"], env)  # the command a user types: no other override
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())  # the killed run's directory gets its metrics
    assert metrics["data/n_skipped"] == 0  # the skip sums (a clean corpus) and their list
    assert (run / "skipped.tsv").read_text().splitlines() == ["split\tshard\tkey\treason\tsamples\tdetail"]
    assert not (tmp_path / "logs").exists() and len(list(tmp_path.iterdir())) == 4  # no new run directory

    lines = _steps(tmp_path / "killed.jsonl")
    after = [s for s in lines if s["step"] > saved_step][-(MAX_STEPS - saved_step):]
    assert [s["step"] for s in after] == list(range(saved_step + 1, MAX_STEPS + 1))
    assert [s["keys"] for s in after] == [reference[s["step"]] for s in after]  # the same remaining batches

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    callback_state = next(v for k, v in b["callbacks"].items() if "ValidatedCheckpoint" in k)
    full_state = next(v for k, v in a["callbacks"].items() if "ValidatedCheckpoint" in k)
    assert Path(callback_state["best_model_path"]).name == Path(full_state["best_model_path"]).name
    assert float(callback_state["best_model_score"]) == float(full_state["best_model_score"])
