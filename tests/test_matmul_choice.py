"""cpu_matmul=auto (model/matmul_choice.py): the faster backend is chosen, measured once per host and stored."""

import json
import logging

import pytest
import torch

import most_lightning.model.gemm as gemm
import most_lightning.model.matmul_choice as choice
from most_lightning.model import MoSTConfig, MoSTForCausalLM
from most_lightning.model.gemm import uses_onednn


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOST_LIGHTNING_CACHE", str(tmp_path))
    choice.forget_choice()
    yield tmp_path / choice.CACHE_FILE
    choice.forget_choice()


def fake_probe(onednn_ms: float, torch_ms: float):
    calls = []

    def measure():
        calls.append(1)
        return {"onednn": onednn_ms, "torch": torch_ms}

    return measure, calls


@pytest.mark.parametrize("onednn_ms, expected", [(60.0, "onednn"), (89.9, "onednn"), (90.5, "torch"), (130.0, "torch")])
def test_onednn_is_chosen_only_when_clearly_faster(cache, onednn_ms, expected):
    measure, _ = fake_probe(onednn_ms, torch_ms=100.0)
    assert choice.auto_backend(measure) == expected  # margin 10%: 90 ms is the line


def test_the_choice_is_stored_per_host_and_not_measured_again(cache, caplog):
    measure, calls = fake_probe(50.0, 100.0)
    with caplog.at_level(logging.INFO, logger=choice.__name__):
        assert choice.auto_backend(measure) == "onednn"
    assert calls == [1]
    stored = json.loads(cache.read_text())
    assert stored[choice.host_key()] | {"measured": None} == dict(backend="onednn", onednn_ms=50.0, torch_ms=100.0,
                                                                 measured=None)
    assert "oneDNN 50.0 ms, torch 100.0 ms" in caplog.text and "-> onednn" in caplog.text
    choice.forget_choice()  # a new process: reads the file
    assert choice.auto_backend(fake_probe(500.0, 1.0)[0]) == "onednn"
    assert calls == [1]


def test_each_thread_count_is_stored_on_its_own_and_a_process_keeps_its_first_choice(cache):
    threads = torch.get_num_threads()
    assert choice.auto_backend(fake_probe(50.0, 100.0)[0]) == "onednn"
    try:
        torch.set_num_threads(threads + 1)
        # e.g. the experts' worker threads (one intra-op thread each): the process' choice holds
        assert choice.auto_backend(fake_probe(150.0, 100.0)[0]) == "onednn"
        choice.forget_choice()  # a new process run with another thread count
        assert choice.auto_backend(fake_probe(150.0, 100.0)[0]) == "torch"
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads(cache.read_text())) == 2
    choice.forget_choice()
    assert choice.auto_backend(fake_probe(150.0, 100.0)[0]) == "onednn"  # this thread count's stored entry


def test_an_unreadable_cache_is_measured_again_with_a_warning(cache, caplog):
    cache.write_text("{ not json")
    measure, calls = fake_probe(150.0, 100.0)
    with caplog.at_level(logging.WARNING, logger=choice.__name__):
        assert choice.auto_backend(measure) == "torch"
    assert calls == [1]
    assert "ignoring unreadable choice cache" in caplog.text and str(cache) in caplog.text
    assert json.loads(cache.read_text())[choice.host_key()]["backend"] == "torch"  # replaced by a good file


def test_an_unwritable_cache_keeps_the_choice_for_the_process(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MOST_LIGHTNING_CACHE", str(blocker / "sub"))  # a directory below a file cannot exist
    choice.forget_choice()
    try:
        with caplog.at_level(logging.WARNING, logger=choice.__name__):
            assert choice.auto_backend(fake_probe(150.0, 100.0)[0]) == "torch"
        assert "could not store the choice" in caplog.text
        assert choice.auto_backend(fake_probe(50.0, 100.0)[0]) == "torch"  # remembered in the process
    finally:
        choice.forget_choice()


def test_the_real_probe_times_both_backends_and_leaves_the_random_state_alone(cache):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with torch.inference_mode():  # as in Lightning's validation before training: the probe needs its backward
        timings = choice.probe(reps=1, batch=1, seq_len=16)
        assert torch.is_inference_mode_enabled()
    assert set(timings) == {"onednn", "torch"} and all(t > 0 for t in timings.values())
    assert torch.equal(torch.rand(3), expected_next)  # a run's initialisation must not depend on the cache


def test_auto_resolves_through_the_stored_choice(cache):
    x = torch.randn(4, 4)
    for stored in ("onednn", "torch"):
        choice.forget_choice()
        cache.write_text(json.dumps({choice.host_key(): {"backend": stored}}))
        assert uses_onednn("auto", x) is (stored == "onednn")
    assert uses_onednn("onednn", x) and not uses_onednn("torch", x)


def must_not_measure():
    raise AssertionError("measured")


def test_auto_never_measures_where_onednn_cannot_apply(cache, monkeypatch):
    monkeypatch.setattr(choice, "probe", must_not_measure)
    assert not uses_onednn("auto", torch.randn(2, 2, dtype=torch.bfloat16))
    assert not uses_onednn("auto", torch.randn(2, 2, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn("auto", torch.randn(2, 2))
    assert not cache.exists()


def test_the_model_defaults_to_auto_and_follows_the_choice(cache, monkeypatch):
    config = MoSTConfig.from_preset("tiny", vocab_size=64, num_layers=1)
    assert config.cpu_matmul == "auto"
    model = MoSTForCausalLM(config)
    calls, real = [], gemm._nt
    monkeypatch.setattr(gemm, "_nt", lambda *a: calls.append(1) or real(*a))
    for stored, expect_onednn in (("torch", False), ("onednn", True)):
        choice.forget_choice()
        cache.write_text(json.dumps({choice.host_key(): {"backend": stored}}))
        calls.clear()
        model(torch.randint(0, 64, (1, 8)), torch.zeros(1, 8, dtype=torch.long))
        assert bool(calls) is expect_onednn


def test_a_made_choice_costs_a_lookup_not_a_host_description(cache, monkeypatch):
    """uses_onednn("auto") runs before every product: after the first call it must not read /proc/cpuinfo or
    the cache file again (it did once, and cost the tiny step 5%)."""
    cache.write_text(json.dumps({choice.host_key(): {"backend": "torch"}}))
    x = torch.randn(2, 2)
    assert not uses_onednn("auto", x)

    def fail(*_):
        raise AssertionError("looked up again")

    monkeypatch.setattr(choice, "host_key", fail)
    monkeypatch.setattr(choice, "_read_cache", fail)
    assert not uses_onednn("auto", x)


def test_the_experts_decide_before_their_worker_threads_start(cache, monkeypatch):
    """The loop experts' workers run with one intra-op thread: a decision made there would look up (or measure)
    the one-thread setting. The stored entry is for this thread count only; measuring would fail the test."""
    import most_lightning.model.experts as experts_module
    from most_lightning.model.experts import GroupedExperts

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cache.write_text(json.dumps({choice.host_key(): {"backend": "onednn"}}))
        monkeypatch.setattr(choice, "probe", must_not_measure)
        monkeypatch.setattr(experts_module, "MIN_MACS_PER_WORKER", 1)  # split even this over the two threads
        calls, real = [], gemm._nt
        monkeypatch.setattr(gemm, "_nt", lambda *a: calls.append(1) or real(*a))
        experts = GroupedExperts(8, 4, 4, dispatch="loop", cpu_matmul="auto")
        indices = torch.arange(24).remainder(4).view(12, 2)
        x = torch.randn(12, 8, requires_grad=True)
        experts(x, indices, torch.rand(12, 2)).sum().backward()
        assert calls and choice.auto_backend() == "onednn"
    finally:
        torch.set_num_threads(threads)


def test_where_the_choice_is_stored(monkeypatch, tmp_path):
    monkeypatch.setenv("MOST_LIGHTNING_CACHE", str(tmp_path / "explicit"))
    assert choice.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MOST_LIGHTNING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert choice.cache_dir() == tmp_path / "xdg" / "most_lightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert choice.cache_dir() == tmp_path / "home" / ".cache" / "most_lightning"

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(choice.Path, "home", staticmethod(no_home))
    assert choice.cache_dir().name == "most_lightning" and choice.cache_dir().parent.is_dir()
