"""Every setting checked before any work: bad data settings fail when the config is composed, naming the field and
what it allows; documented keys exist without `+`; mode=eval without eval= runs the default suite."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import pytest

from conftest import CONF_DIR, REPO_ROOT, compose_run_config
from most_lightning.data.settings import GROUPS
from most_lightning.data.settings_check import DATAMODULE_TARGET, DataConfigError, check_data_config


def _check(overrides: list[str], tmp_path: Path) -> None:
    from run import check_settings

    check_settings(compose_run_config(overrides, tmp_path))


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "shards" / "train-00000.tar"
    path.parent.mkdir()
    path.write_bytes(b"")
    return path


# (overrides, what the message must say)
BAD = [
    (["data.batch_size=0"], r"data\.batch_size=0: must be an integer >= 1"),
    (["data.batch_size=-3"], r"data\.batch_size=-3: must be an integer >= 1"),
    (["data.batch_size=2.5"], r"data\.batch_size=2\.5: must be an integer >= 1"),
    (["data.eval_batch_size=0"], r"data\.eval_batch_size=0: must be an integer >= 1 or null"),
    (["data.num_workers=-1"], r"data\.num_workers=-1: must be an integer >= 0"),
    (["data.max_length=0"], r"data\.max_length=0: must be an integer >= 1 or null"),
    (["data.max_length=100000"], r"data\.max_length=100000: must be <= the model's max_position_embeddings \(2048\)"),
    (["data.max_tokens=0"], r"data\.max_tokens=0: must be an integer >= 1 or null"),
    (["data.batching=bucket", "data.max_tokens=null"],
     r"data\.max_tokens=null: data\.batching=bucket needs a token budget"),
    (["data.batching=pack", "data.max_length=1024", "data.max_tokens=512"],
     r"data\.max_length=1024: .*<= data\.max_tokens \(512\)"),
    (["data.batching=pack", "data.max_length=null", "data.max_tokens=512"], r"data\.max_length=None: .*pack"),
    (["data.batching=fancy"], r"data\.batching='fancy': allowed values are \['fixed', 'bucket', 'pack'\]"),
    (["+data.bucket_pool=0"], r"data\.bucket_pool=0: must be an integer >= 1"),
    (["data.shuffle_buffer=-1"], r"data\.shuffle_buffer=-1: must be an integer >= 0"),
    (["data.batches_per_epoch=0"], r"data\.batches_per_epoch=0: must be an integer >= 1 or null"),
    (["data.val_limit=0"], r"data\.val_limit=0"),
    (["data.on_bad_sample=ignore"], r"data\.on_bad_sample='ignore': allowed values are \['skip', 'raise'\]"),
    (["data.max_length_policy=cut"], r"data\.max_length_policy='cut'"),
    (["data.shard_sampling=random"], r"data\.shard_sampling='random'"),
    (["data.task_weights.asr=-0.4"], r"data\.task_weights\.asr=-0\.4: a weight must be a finite number >= 0"),
    (["data.task_weights={asr: 0, tts: 0, text: 0}"], r"data\.task_weights=.*at least one task a weight > 0"),
    (["+data.task_weights.speech=1"], r"data\.task_weights: unknown task\(s\) \['speech'\]"),
    (["data.task_weights.asr=nan"], r"data\.task_weights\.asr=nan"),
    (["data.val_tasks=[asr,speech]"], r"data\.val_tasks=\['asr', 'speech'\]: must be a list of tasks"),
    (["data.corpus.n_train=0"], r"data\.corpus: .*n_train must be >= 1"),
    (["data.corpus_dir=/nonexistent/corpus"], r"data\.corpus_dir='/nonexistent/corpus': no manifest\.json"),
    (["data.tokenizer.vocab=1"], None),  # Hydra itself refuses a key the group lacks (struct mode)
    (["data.sources={a: {shards: /nonexistent/x-*.tar, tasks: {asr: 1}}}"],
     r"data\.sources\.a\.shards: .*no shard matches '/nonexistent/x-\*\.tar'"),
    (["data.sources={a: {shards: 'SHARD_DIR/x-{0..3.tar', tasks: {asr: 1}}}"],
     r"data\.sources\.a\.shards: unbalanced braces"),
    (["data.sources={a: {shards: SHARD, tasks: {asr: 1, text: 1}}}"],
     r"data\.sources\.a\.tasks mixes record kinds \['speech', 'text'\]"),
    (["data.sources={a: {shards: SHARD, tasks: {asr: -1}}}"], r"data\.sources\.a\.tasks\.asr=-1: a weight"),
    (["data.sources={a: {shards: SHARD, tasks: {asr: 0}}}"], r"data\.sources: no task of any source"),
    (["data.sources={a: {shards: SHARD, tasks: {asrr: 1}}}"], r"data\.sources\.a\.tasks: unknown task\(s\)"),
    (["data.sources={a: {shards: SHARD, weight: 2, tasks: {asr: 1}}}"], r"data\.sources\.a: unknown keys \['weight'\]"),
    (["data.sources={a: {shards: [], tasks: {asr: 1}}}"], r"data\.sources\.a\.shards=\[\]: must be a shard path"),
    (["data.sources={a: {tasks: {asr: 1}}}"], r"data\.sources\.a=.*must be \{shards:"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_data_settings_fail_at_composition_with_the_field(overrides, message, shard, tmp_path):
    overrides = [o.replace("SHARD_DIR", str(shard.parent)).replace("SHARD", str(shard)) for o in overrides]
    if message is None:
        from hydra.errors import ConfigCompositionException

        with pytest.raises(ConfigCompositionException):
            _check(overrides, tmp_path)
        return
    with pytest.raises(DataConfigError, match=message):
        _check(overrides, tmp_path)


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_good_sources_and_every_shipped_data_and_experiment_config_pass(shard, tmp_path):
    _check([f"data.sources={{a: {{shards: {shard}, tasks: {{asr: 0.5, tts: 0.5}}}}, "
            f"b: {{shards: '{shard.parent}/train-{{00000..00000}}.tar', tasks: {{tts: 0}}}}}}",
            "data.batching=pack", "data.max_tokens=2048"], tmp_path)
    for option in sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml")):
        _check([f"data={option}"], tmp_path)
    for option in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        _check([f"experiment={option}"], tmp_path)


def _literal_fields() -> list[tuple[type, str, tuple]]:
    """(group class, field, the values its Literal type allows), read off the dataclasses themselves."""
    out = []
    for cls in GROUPS.values():
        hints = get_type_hints(cls)
        out += [(cls, f.name, get_args(hints[f.name])) for f in dataclasses.fields(cls)
                if get_origin(hints[f.name]) is Literal]
    return out


def _min_int_fields() -> list[tuple[type, dataclasses.Field, bool]]:
    """(group class, field, null allowed) for the integer fields that declare a minimum."""
    out = []
    for cls in GROUPS.values():
        hints = get_type_hints(cls)
        out += [(cls, f, type(None) in get_args(hints[f.name])) for f in dataclasses.fields(cls)
                if "minimum" in f.metadata]
    return out


def _composed(**settings) -> dict:
    # a valid flat data group but for `settings` (pack-compatible token budget, so every batching passes)
    return {"_target_": DATAMODULE_TARGET, "max_tokens": 64, "max_length": 32, **settings}


def test_choices_and_ranges_come_from_the_settings_dataclasses():
    """One source: settings_check accepts exactly what each dataclass field's type allows, refuses the rest
    with the same message the dataclass raises, and so checks every choice field (data.verify included)."""
    choices = _literal_fields()
    assert {name for _, name, _ in choices} == {"batching", "shard_sampling", "few_shards", "max_length_policy",
                                                "on_bad_sample", "verify", "verify_audio"}
    for cls, name, allowed in choices:
        for value in allowed:
            check_data_config(_composed(**{name: value}))
            cls(**{name: value})
        with pytest.raises(DataConfigError) as early:
            check_data_config(_composed(**{name: "nope"}))
        assert str(early.value) == f"data.{name}='nope': allowed values are {list(allowed)}"
        with pytest.raises(DataConfigError) as built:
            cls(**{name: "nope"})
        assert str(built.value) == str(early.value)
    ints = _min_int_fields()
    assert len(ints) == 11
    for cls, field, allow_null in ints:
        minimum = field.metadata["minimum"]
        check_data_config(_composed(**{field.name: minimum}))
        assert getattr(cls(**{field.name: minimum}), field.name) == minimum
        if allow_null:
            check_data_config(_composed(**{field.name: None}))
        for bad in [minimum - 1, 2.5, True] + ([] if allow_null else [None]):
            with pytest.raises(DataConfigError, match=rf"^data\.{field.name}=.*: must be an integer >= {minimum}"
                               + (" or null" if allow_null else "") + "$") as early:
                check_data_config(_composed(**{field.name: bad}))
            with pytest.raises(DataConfigError) as built:
                cls(**{field.name: bad})
            assert str(built.value) == str(early.value)


def test_another_datamodule_target_is_left_alone():
    check_data_config({"_target_": "my.DataModule", "batch_size": 0})


def test_corpus_dir_is_a_config_key(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "manifest.json").write_text("{}")
    cfg = compose_run_config([f"data.corpus_dir={tmp_path / 'corpus'}"], tmp_path)  # no `+` needed
    assert cfg.data.corpus_dir == str(tmp_path / "corpus")
    _check([f"data.corpus_dir={tmp_path / 'corpus'}"], tmp_path)


def test_mode_eval_without_a_suite_gets_the_default_suite(tmp_path):
    cfg = compose_run_config(["mode=eval"], tmp_path)
    assert cfg.eval.name == "default" and sorted(cfg.eval.tasks) == ["asr", "text_ppl"]  # docs/evaluation.md
    assert compose_run_config(["mode=eval", "eval=asr"], tmp_path).eval.name == "asr"


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_batch_size_zero_fails_before_any_data_or_trainer_work(tmp_path):
    """It used to end in a bare ZeroDivisionError after the corpus build and the Trainer."""
    data_dir = tmp_path / "data"
    result = subprocess.run([sys.executable, "run.py", "data=tiny", "data.batch_size=0", f"paths.data_dir={data_dir}",
                             f"paths.log_dir={tmp_path / 'logs'}"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "data.batch_size=0: must be an integer >= 1" in result.stderr
    assert "ZeroDivisionError" not in result.stderr
    assert not data_dir.exists()  # no corpus was built
    assert "GPU available" not in result.stdout + result.stderr  # no Trainer was built
