"""Nothing executes from a checkpoint file: crafted pickles and remote addresses are refused, whatever the
environment says (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), and the payload never runs."""

from __future__ import annotations

import http.server
import os
import pathlib
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import REPO_ROOT
from most_lightning.checkpoint_safety import RemoteCheckpointError, load_weights_only, local_checkpoint_path


class Payload:
    """Unpickling this creates the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": Payload(marker)}, path)
    return path


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    return ckpt, marker


def test_the_crafted_checkpoint_really_carries_a_payload(crafted):
    """The oracle for the tests below: an unrestricted load runs the payload."""
    ckpt, marker = crafted
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_crafted_local_checkpoint_is_refused_even_with_the_env_override(crafted, monkeypatch):
    ckpt, marker = crafted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only(ckpt)
    from most_lightning.eval.checkpoint import read_eval_checkpoint
    from most_lightning.lit.checkpoint import read_checkpoint

    for read in (read_eval_checkpoint, read_checkpoint):
        with pytest.raises(pickle.UnpicklingError):
            read(ckpt)
    from most_lightning.model.checkpoint.__main__ import model_from_lightning

    with pytest.raises(pickle.UnpicklingError):
        model_from_lightning(ckpt)
    # the audio front end's and vocoder's loaders: HuBERT (fairseq layout), k-means centroids, unit HiFi-GAN
    from most_lightning.audio.hifigan import load_unit_hifigan
    from most_lightning.audio.hubert_checkpoints import HubertCheckpointError, read_hubert_checkpoint
    from most_lightning.audio.quantizer import QuantizerFileError, _read_torch_centroids

    with pytest.raises(HubertCheckpointError, match="weights_only"):
        read_hubert_checkpoint(ckpt, format="fairseq")
    with pytest.raises(QuantizerFileError, match="weights_only"):
        _read_torch_centroids(str(ckpt))
    (ckpt.parent / "config.json").write_text("{}")
    with pytest.raises(pickle.UnpicklingError):
        load_unit_hifigan(ckpt)
    assert not marker.exists()


@pytest.mark.slow
def test_run_py_refuses_a_crafted_resume_checkpoint_with_the_env_override(crafted, cfg_fast, monkeypatch):
    """run.py's fit loads ckpt_path through Lightning with weights_only=True passed explicitly."""
    from run import train

    ckpt, marker = crafted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with open_dict(cfg_fast):
        cfg_fast.ckpt_path = str(ckpt)
    with pytest.raises(pickle.UnpicklingError):
        train(cfg_fast)
    assert not marker.exists()


class _Server:
    """http.server on 127.0.0.1 in a thread, serving one directory; counts the requests it answered."""

    def __init__(self, directory: Path):
        served = self
        self.requests = 0

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(directory), **kw)

            def do_GET(self):
                served.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def test_served_checkpoint_url_is_refused_before_any_request(crafted, monkeypatch):
    from most_lightning.eval.checkpoint import load_for_eval
    from most_lightning.lit.resume import checkpoint_to_resume, resume_argv

    ckpt, marker = crafted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with _Server(ckpt.parent) as server:
        url = f"{server.url}/{ckpt.name}"
        import urllib.request

        assert urllib.request.urlopen(url, timeout=5).read() == ckpt.read_bytes()  # the server really serves it
        served_before = server.requests
        for call in (lambda: checkpoint_to_resume(OmegaConf.create({"ckpt_path": url})),
                     lambda: resume_argv([f"ckpt_path={url}"]),
                     lambda: resume_argv([f"resume={server.url}/run"]),
                     lambda: load_for_eval(url, {}, {}, 10),
                     lambda: load_weights_only(url)):
            with pytest.raises(RemoteCheckpointError, match="Download it first"):
                call()
        assert server.requests == served_before
    assert not marker.exists()
    assert local_checkpoint_path(f"file://{ckpt}") == str(ckpt)


@pytest.mark.slow
def test_run_py_command_line_refuses_a_url_with_the_env_override(crafted, tmp_path):
    ckpt, marker = crafted
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONPATH=str(REPO_ROOT))
    with _Server(ckpt.parent) as server:
        for mode in ("train", "eval"):
            out = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), f"ckpt_path={server.url}/{ckpt.name}",
                                  f"mode={mode}", f"paths.log_dir={tmp_path / 'logs'}"],
                                 capture_output=True, text=True, env=env, timeout=300)
            assert out.returncode != 0
            assert "Download it first" in out.stderr + out.stdout, out.stderr[-2000:]
        assert server.requests == 0
    assert not marker.exists()
