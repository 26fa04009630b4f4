"""Routers as plug-ins: selection by _target_ or name, per-class configs, the buffer / state / per-step hooks,
router-owned tensors in the import and upcycling plans, and the aux-loss-free balancing bias (hand-computed)."""

from __future__ import annotations

import pytest
import torch

from most_lightning.model import ConfigError, MoSTConfig, MoSTForCausalLM
from most_lightning.model.checkpoint import empty_model
from most_lightning.model.router import (
    AuxFreeRouter,
    ModalityAwareAuxFreeRouter,
    build_router,
    router_config,
    routers,
    routers_after_optimizer_step,
)

PLUGIN = "tests.plugins.annealed_router.AnnealedRouter"
E, K, H = 8, 2, 16


def tiny(router, **overrides) -> MoSTConfig:
    values = dict(vocab_size=100, hidden_size=32, moe_intermediate_size=16, intermediate_size=64, num_layers=2,
                  router=router)
    return MoSTConfig.from_preset("tiny", **{**values, **overrides})


def make_router(name, **fields):
    config = MoSTConfig.from_preset("tiny", hidden_size=H, n_routed_experts=E, top_k=K,
                                    router=dict(name=name, **fields))
    torch.manual_seed(0)
    router = build_router(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    return router.train()


# ---- selection and configs -----------------------------------------------------------------------------------------
def test_target_and_name_select_the_same_class_and_its_own_config():
    by_name = router_config({"name": "modality_aware_aux_free", "mask": "logits"})
    by_target = router_config({"_target_": "most_lightning.model.router.ModalityAwareAuxFreeRouter",
                               "mask": "logits"})
    assert by_name == by_target and by_name.name == "modality_aware_aux_free"
    assert (by_name.mask, by_name.bias_update_rate) == ("logits", 0.001)  # the class's own dataclass defaults
    plugin = router_config({"_target_": PLUGIN, "start_temperature": 3.0, "balance_loss_alpha": 0.0})
    assert type(plugin).__name__ == "AnnealedConfig" and plugin.name == PLUGIN
    assert (plugin.start_temperature, plugin.decay, plugin.balance_loss_alpha) == (3.0, 0.9, 0.0)
    # a config round-trips through its dict (Lightning hyperparameters, our export's config.json)
    assert router_config(MoSTConfig(**tiny(plugin).to_dict()).router) == plugin


def test_unknown_router_is_one_line_with_the_names_and_how_to_register():
    for node in ({"name": "topk_magic"}, {"_target_": "no_such_module.Router"},
                 {"_target_": "tests.plugins.annealed_router.NotARouter"}):
        with pytest.raises(ConfigError) as err:
            router_config(node)
        message = str(err.value)
        assert "\n" not in message
        assert "registered names: aux_free, modality_aware, modality_aware_aux_free" in message
        assert "router._target_=<module.Class>" in message and "@register_router" in message
    with pytest.raises(ConfigError, match="not a Router subclass"):
        router_config({"_target_": "tests.plugins.annealed_router.NotARouter"})


def test_unknown_field_names_the_field_and_the_router_class():
    with pytest.raises(ConfigError, match=r"router field\(s\) mask: not a setting of VanillaRouter "
                                          r"\(most_lightning.model.router\); its settings are balance_loss_alpha, "):
        router_config({"name": "vanilla", "mask": "logits"})
    with pytest.raises(ConfigError, match=r"start_temprature: not a setting of AnnealedRouter"):
        router_config({"_target_": PLUGIN, "start_temprature": 3.0})
    with pytest.raises(ConfigError, match="router.start_temperature=-1"):  # the plug-in's own validation
        router_config({"_target_": PLUGIN, "start_temperature": -1})


def test_target_on_top_of_a_named_file_replaces_the_name():
    assert router_config({"name": "modality_aware", "_target_": PLUGIN}).name == PLUGIN


# ---- hooks ---------------------------------------------------------------------------------------------------------
def test_buffers_are_rebuilt_after_meta_device_materialisation():
    config = tiny({"_target_": PLUGIN, "start_temperature": 4.0})
    model = empty_model(config)
    (_, router), = routers(model)
    with torch.no_grad():
        router.temperature.fill_(4.0)  # persistent: loaded (here by hand), then the buffers follow from it
    router.init_buffers()
    assert router.log_temperature.item() == pytest.approx(torch.tensor(4.0).log().item())
    aware = empty_model(tiny({"name": "modality_aware"}, audio_expert_fraction=0.25))
    (_, router), = routers(aware)
    assert router.group_mask.tolist() == [[True] * 6 + [False] * 2, [False] * 6 + [True] * 2]


def test_a_plugin_that_leaves_a_buffer_stale_fails_at_start_up():
    config = tiny({"_target_": "tests.plugins.annealed_router.StaleBufferRouter"})
    with pytest.raises(ConfigError, match=r"StaleBufferRouter\) leaves its non-persistent buffer\(s\) \['scale'\]"):
        MoSTForCausalLM(config)
    with pytest.raises(ConfigError, match="StaleBufferRouter.init_buffers"):
        empty_model(config)


def test_per_step_hook_and_state_travel_with_the_state_dict():
    model = MoSTForCausalLM(tiny({"_target_": PLUGIN, "start_temperature": 3.0, "decay": 0.5}))
    routers_after_optimizer_step(model)
    routers_after_optimizer_step(model)
    (prefix, router), = routers(model)
    assert router.temperature.item() == pytest.approx(1.5) and router.steps.item() == 2  # 1 + 2 * 0.5^2
    state = model.state_dict()
    assert {f"{prefix}.modality_offset", f"{prefix}.temperature", f"{prefix}.steps"} <= set(state)
    assert f"{prefix}.log_temperature" not in state  # non-persistent
    fresh = MoSTForCausalLM(tiny({"_target_": PLUGIN, "start_temperature": 3.0, "decay": 0.5}))
    fresh.load_state_dict(state)
    next(routers(fresh))[1].init_buffers()
    ids = torch.randint(0, 100, (2, 12))
    modality = torch.randint(0, 2, (2, 12))
    torch.testing.assert_close(fresh.eval()(ids, modality).logits, model.eval()(ids, modality).logits)


def test_missing_modality_is_an_error_when_the_router_uses_the_partition():
    ids = torch.randint(0, 100, (1, 8))
    with pytest.raises(ValueError, match="modality is required: router 'modality_aware'"):
        MoSTForCausalLM(tiny({"name": "modality_aware"}))(ids)
    MoSTForCausalLM(tiny({"name": "vanilla"}))(ids)  # the vanilla router reads no marks


# ---- router-owned tensors in the import and upcycling plans --------------------------------------------------------
def test_import_initialises_router_owned_tensors_by_the_router_and_reports_them(tmp_path):
    pytest.importorskip("transformers")
    from hf_checkpoints import deepseek_model, llama_model, save_hf
    from most_lightning.model.checkpoint import load_pretrained, upcycle_pretrained

    path = save_hf(deepseek_model(), tmp_path / "deepseek")
    model, report = load_pretrained(path, router={"_target_": PLUGIN, "start_temperature": 2.5}, progress=False)
    for prefix, router in routers(model):
        for name in ("modality_offset", "temperature", "steps"):
            how = report.initialised_by_rule[f"{prefix}.{name}"]
            assert how == "initialised by the router (AnnealedRouter.reset_state)"
        assert router.temperature.item() == 2.5 and not router.modality_offset.any() and router.steps.item() == 0
    model, report = load_pretrained(path, router={"name": "aux_free"}, progress=False)
    for prefix, router in routers(model):
        assert "AuxFreeRouter.reset_state" in report.initialised_by_rule[f"{prefix}.expert_bias"]
        assert not router.expert_bias.any()

    dense = save_hf(llama_model(), tmp_path / "llama")
    model, report = upcycle_pretrained(dense, n_routed_experts=4, top_k=2, moe_intermediate_size=64,
                                       n_shared_experts=0, first_k_dense_replace=0,
                                       router={"name": "modality_aware_aux_free"}, progress=False)
    assert sum("ModalityAwareAuxFreeRouter.reset_state" in how for how in report.initialised_by_rule.values()) == 3


def test_our_export_reloads_router_owned_tensors_as_they_are(tmp_path):
    from most_lightning.model.checkpoint import load_pretrained
    from most_lightning.model.checkpoint.export import export_hf

    model = MoSTForCausalLM(tiny({"name": "modality_aware_aux_free"}))
    for _, router in routers(model):
        router.expert_bias.copy_(torch.arange(E, dtype=torch.float32) / 100)
    export_hf(model, tmp_path / "export")
    loaded, report = load_pretrained(tmp_path / "export", progress=False)
    assert not any("expert_bias" in k for k in report.initialised_by_rule)
    assert type(loaded.config.router).__name__ == "ModalityAwareAuxFreeConfig"
    for _, router in routers(loaded):
        torch.testing.assert_close(router.expert_bias, torch.arange(E, dtype=torch.float32) / 100)


# ---- aux-loss-free balancing ---------------------------------------------------------------------------------------
def inputs(batch=3, tokens=10, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, tokens, H), torch.randint(0, 2, (batch, tokens))


@pytest.mark.parametrize("name", ["aux_free", "modality_aware_aux_free"])
def test_bias_changes_the_choice_but_not_the_gate_weights(name):
    biased, plain = make_router(name), make_router(name.removesuffix("_aux_free").replace("aux_free", "vanilla"))
    hidden, modality = inputs()
    before = biased(hidden, modality)
    ref = plain(hidden, modality)
    assert torch.equal(before.indices, ref.indices) and torch.equal(before.weights, ref.weights)  # zero bias
    with torch.no_grad():
        biased.expert_bias[:] = torch.tensor([0.0, 0, 0, 0, 0, 0, 5.0, 5.0])  # experts 6, 7 (audio group) always win
    after = biased(hidden, modality)
    logits = hidden.reshape(-1, H) @ biased.weight.T
    scores = logits.softmax(-1)
    if name == "aux_free":
        assert (torch.sort(after.indices, dim=-1).values == torch.tensor([6, 7])).all()
    else:  # text tokens stay in the text group: the bias only reorders within a group
        audio = modality.reshape(-1) == 1
        assert (torch.sort(after.indices[audio], dim=-1).values == torch.tensor([6, 7])).all()
        assert (after.indices[~audio] < 6).all() if biased.group_mask[0, :6].all() else True
        scores = scores.masked_fill(~biased.group_mask[modality.reshape(-1)], 0.0)
    # weights: the unbiased probabilities of the chosen experts
    torch.testing.assert_close(after.weights, scores.gather(1, after.indices))


def test_bias_update_follows_the_load_of_the_step_by_hand():
    router = make_router("modality_aware_aux_free", bias_update_rate=0.1)  # tiny: 4 text + 4 audio experts
    hidden, modality = inputs()
    routing = router(hidden, modality)
    router(hidden, modality)  # two micro-batches in one optimizer step: the load adds up
    counts = torch.bincount(routing.indices.reshape(-1), minlength=E).float() * 2
    groups = router.group_mask.float()
    mean = (groups * ((groups @ counts) / groups.sum(1))[:, None]).sum(0)
    expected = 0.1 * torch.sign(mean - counts)
    router.eval()(hidden, modality)  # evaluation batches do not count
    router.after_optimizer_step()
    torch.testing.assert_close(router.expert_bias, expected)
    router.after_optimizer_step()  # nothing routed since the last step: no change
    torch.testing.assert_close(router.expert_bias, expected)

    vanilla = make_router("aux_free", bias_update_rate=0.1)
    routing = vanilla(hidden, modality)
    counts = torch.bincount(routing.indices.reshape(-1), minlength=E).float()
    summed = []
    vanilla.after_optimizer_step(reduce=lambda t: summed.append(t) or t * 3)  # e.g. three ranks with this load
    torch.testing.assert_close(summed[0], counts)
    torch.testing.assert_close(vanilla.expert_bias, 0.1 * torch.sign(counts.mean() - counts))


def test_bias_balances_a_skewed_gate():
    """A gate that prefers experts 0 and 4 for every token: the bias alone evens the load out."""
    for cls, name in ((AuxFreeRouter, "aux_free"), (ModalityAwareAuxFreeRouter, "modality_aware_aux_free")):
        router = make_router(name, bias_update_rate=0.003).train()
        assert isinstance(router, cls)
        with torch.no_grad():
            router.weight[0, 0] = router.weight[4, 0] = 4.0
        hidden, modality = inputs(batch=8, tokens=32)
        hidden[..., 0] = 1.0

        def step() -> torch.Tensor:
            load = torch.bincount(router(hidden, modality).indices.reshape(-1), minlength=E).float()
            router.after_optimizer_step()
            return load

        start = step()
        for _ in range(250):
            step()
        end = sum(step() for _ in range(50))  # the sign rule oscillates by one step: look at a window
        assert start.max() / start.mean() > 1.6 and end.max() / end.mean() < 1.2


# ---- the Hydra side: conf/router files on the router/base node -----------------------------------------------------
def test_router_files_and_command_line_fields_compose_without_plus():
    from conftest import compose_run_config
    from most_lightning.model.config_groups import build_router_config

    cfg = compose_run_config(["router=modality_aware_aux_free", "router.bias_update_rate=0.01", "router.mask=logits"])
    router = build_router_config(cfg.router)
    assert type(router).__name__ == "ModalityAwareAuxFreeConfig"
    assert (router.bias_update_rate, router.mask, router.balance_loss_alpha) == (0.01, "logits", 0.0)
    cfg = compose_run_config([f"router._target_={PLUGIN}", "router.decay=0.5"])
    assert build_router_config(cfg.router).name == PLUGIN and build_router_config(cfg.router).decay == 0.5
    cfg = compose_run_config(["router=vanilla", "router.bias_update_rate=0.01"])
    with pytest.raises(ConfigError, match="bias_update_rate: not a setting of VanillaRouter"):
        build_router_config(cfg.router)


def test_old_vanilla_config_with_the_retired_mask_field_loads_with_a_notice(caplog, monkeypatch):
    """Before routers owned their configs, every router's saved config carried mask: probs (its default)."""
    import most_lightning.model.router as router_module

    monkeypatch.setattr(router_module, "_noticed_retired", set())
    old_style = {"name": "vanilla", "balance_loss_alpha": 0.01, "z_loss_coef": 0.0, "mask": "probs",
                 "renormalize": False, "routed_scaling_factor": 1.0}
    with caplog.at_level("WARNING", logger="most_lightning.model.router"):
        config = router_config(old_style)
        router_config(old_style)
    assert config.name == "vanilla" and config.balance_loss_alpha == 0.01
    assert not hasattr(config, "mask")
    notices = [r.getMessage() for r in caplog.records if "mask" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0] and "VanillaRouter" in notices[0]  # one line, once
    assert router_config({**old_style, "name": "modality_aware"}).mask == "probs"  # still a real field there
    with pytest.raises(ConfigError, match="mask: not a setting of VanillaRouter"):  # set by hand: still refused
        router_config({**old_style, "mask": "logits"})
    # the model config of such a checkpoint builds too (its hparams' router node goes through the same path)
    assert tiny(old_style).router.name == "vanilla"


def test_target_names_the_run_in_saved_configs():
    from most_lightning.model.router import labelled_router_node, router_label

    node = {"name": "modality_aware", "_target_": PLUGIN, "balance_loss_alpha": 0.0}
    assert router_label(node) == PLUGIN
    assert labelled_router_node(node) == {**node, "name": PLUGIN}
    registered = {"name": "modality_aware", "_target_": "most_lightning.model.router.VanillaRouter"}
    assert labelled_router_node(registered)["name"] == "vanilla"  # a registered class keeps its short name
    assert labelled_router_node({"name": "vanilla"}) == {"name": "vanilla"}  # no _target_: unchanged


def test_run_and_summaries_label_a_target_given_on_top_of_a_file(tmp_path):
    """`router=modality_aware router._target_=X`: the saved config and the summary table say X, not the file."""
    from conftest import compose_run_config
    from omegaconf import OmegaConf

    from most_lightning.experiments.summarize import load_run_dir
    from run import label_router_by_target

    cfg = compose_run_config(["router=modality_aware", f"router._target_={PLUGIN}"], tmp_path)
    assert cfg.router.name == "modality_aware"  # what Hydra composes
    label_router_by_target(cfg)
    assert cfg.router.name == PLUGIN
    # a run saved before this fix (or one that died before config_resolved.yaml) is labelled by its target too
    run_dir = tmp_path / "old_run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save({"router": {"name": "modality_aware", "_target_": PLUGIN}}, run_dir / ".hydra" / "config.yaml")
    assert load_run_dir(run_dir, "old").value("router.name") == PLUGIN
