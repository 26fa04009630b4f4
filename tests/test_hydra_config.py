"""The Hydra config tree: every option composes, model/router groups build valid MoSTConfigs, and the CLI's
--help / --cfg job / bad-config paths answer without touching any data."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, REPO_ROOT, compose_run_config
from most_lightning.model import ConfigError, MoSTConfig
from most_lightning.model.config_groups import build_model_config

GROUPS = ["model", "router", "data", "trainer", "logger", "callbacks", "lit", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose_run_config([f"{group}={option}"], tmp_path)
    with open_dict(cfg):
        cfg.pop("hydra")  # read-only; HydraConfig keeps its own copy for ${hydra:...}
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.paths.output_dir == str(tmp_path / "run")


@pytest.mark.parametrize("router", options("router"))
@pytest.mark.parametrize("model", options("model"))
def test_model_and_router_groups_build_valid_configs(model, router, tmp_path):
    cfg = compose_run_config([f"model={model}", f"router={router}"], tmp_path)
    config = build_model_config(cfg.model, cfg.router, vocab_size=1234)
    assert isinstance(config, MoSTConfig) and config.vocab_size == 1234
    preset = MoSTConfig.from_preset(cfg.model.preset, vocab_size=1234, router=config.router)
    assert config == preset, "conf/model yaml drifted from the preset it names"


@pytest.mark.parametrize("model", options("model"))
def test_model_group_is_the_python_preset_without_a_copy(model, tmp_path):
    """conf/model/<preset>.yaml restates nothing: the composed group is every MoSTConfig field a user may set (all
    visible in --cfg job) at the preset's value, from most_lightning.model.config alone."""
    import dataclasses

    from most_lightning.model.checkpoint.init import INIT_DEFAULTS
    from most_lightning.model.config import PRESETS

    assert set(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")) == {"defaults"}
    group = OmegaConf.to_container(compose_run_config([f"model={model}"], tmp_path).model)
    preset = group.pop("preset")
    assert group.pop("init") == INIT_DEFAULTS
    defaults = MoSTConfig()
    settable = [f.name for f in dataclasses.fields(MoSTConfig) if f.name not in ("vocab_size", "router")]
    assert sorted(group) == sorted(settable)
    for name in settable:
        assert group[name] == PRESETS[preset].get(name, getattr(defaults, name)), name


def test_model_fields_are_set_without_plus_and_typos_are_refused_at_compose(tmp_path):
    from hydra.errors import ConfigCompositionException

    cfg = compose_run_config(["model.hidden_size=64", "model.kv_lora_rank=16", "model.init.partition=copy"], tmp_path)
    assert (cfg.model.hidden_size, cfg.model.kv_lora_rank, cfg.model.init.partition) == (64, 16, "copy")
    with pytest.raises(ConfigCompositionException, match="hiden_size"):
        compose_run_config(["model.hiden_size=64"], tmp_path)


def test_router_variants_set_the_switches(tmp_path):
    def router(name):
        return build_model_config(compose_run_config([f"router={name}"], tmp_path).model,
                                  compose_run_config([f"router={name}"], tmp_path).router, 100).router

    assert (router("modality_aware").name, router("modality_aware").mask) == ("modality_aware", "probs")
    assert router("modality_aware_logits").mask == "logits"
    assert router("modality_aware_renorm").renormalize is True
    assert router("vanilla").name == "vanilla"


def test_bad_model_values_fail_with_the_field_name(tmp_path):
    cfg = compose_run_config(["model.audio_expert_fraction=0.9"], tmp_path)
    with pytest.raises(ConfigError, match="audio_expert_fraction"):
        build_model_config(cfg.model, cfg.router, 100)
    cfg = compose_run_config(["+model.no_such_field=1"], tmp_path)
    with pytest.raises(ConfigError, match="no_such_field"):
        build_model_config(cfg.model, cfg.router, 100)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_composed_config_takes_the_group_choices():
    cfg = compose_run_config(["router=vanilla", "model.n_shared_experts=0"])
    assert cfg.router.name == "vanilla" and cfg.model.n_shared_experts == 0
    assert cfg.optimized_metric and "trainer" in cfg and "data" in cfg


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_help_lists_the_config_groups():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for group in ("model", "router", "data", "trainer", "logger", "experiment"):
        assert f"{group}:" in result.stdout


def test_unknown_router_file_lists_the_available_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_run_config(["router=no_such_router"], tmp_path)
    for name in ("no_such_router", "modality_aware", "vanilla", "aux_free"):
        assert name in str(err.value)


def test_unknown_router_name_fails_before_any_data_work(tmp_path):
    from run import train

    cfg = compose_run_config(["router.name=no_such_router", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "router 'no_such_router' is not a known router; registered names: aux_free, modality_aware" in message
    assert "router._target_=<module.Class>" in message and "\n" not in message
    assert not (tmp_path / "data").exists()  # failed at start-up, before the corpus build


def test_tiny_data_config_is_the_data_tests_recipe(tmp_path):
    """Same recipe hash -> the e2e tests reuse the corpus the data tests build (one build per session)."""
    from most_lightning.data import DemoCorpusRecipe
    from most_lightning.data.testing import TINY_RECIPE

    cfg = compose_run_config(["data=tiny"], tmp_path)
    recipe = DemoCorpusRecipe.from_any(OmegaConf.to_container(cfg.data.corpus, resolve=True))
    assert recipe.hash() == TINY_RECIPE.hash()


def test_router_ablation_experiment_defines_the_four_cell_grid(tmp_path):
    cfg = compose_run_config(["experiment=router_ablation"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert params["router"] == "vanilla,modality_aware,aux_free,modality_aware_aux_free"
    assert params["model.n_shared_experts"] == "0,2"
    assert cfg.task_name == "router_ablation"
