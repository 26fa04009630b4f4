"""Our model in transformers' DeepSeek-V2 terms: the config and the state-dict layout.

Used as the parity oracle in tests and benchmarks (and the seed of the HF export). transformers is only
needed when ``to_hf_deepseek_config`` is called.
"""

from __future__ import annotations

import torch

from most_lightning.model.config import MoSTConfig


def to_hf_deepseek_config(c: MoSTConfig, **extra):
    """A transformers ``DeepseekV2Config`` with the same architecture numbers (vanilla routing semantics)."""
    from transformers import DeepseekV2Config

    if c.attention != "mla":
        raise ValueError(f"transformers' DeepSeek-V2 needs MLA attention; this config uses {c.attention!r}")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        if c.rope_scaling.get("type") != "yarn":
            raise ValueError(f"only YaRN rope scaling maps onto DeepSeek-V2, not {c.rope_scaling.get('type')!r}")
        rope = {"rope_type": "yarn", "rope_theta": c.rope_theta,
                **{k: v for k, v in c.rope_scaling.items() if k != "type"}}
    return DeepseekV2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads, n_shared_experts=c.n_shared_experts,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.top_k,
        first_k_dense_replace=c.first_k_dense_replace, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        rope_parameters=rope, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        norm_topk_prob=False, topk_method="greedy", routed_scaling_factor=c.router.routed_scaling_factor,
        tie_word_embeddings=c.tie_word_embeddings, **extra,
    )


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights in transformers' key layout: stacked experts -> fused ``gate_up_proj`` (gate over up)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".mlp.experts." in key:
            prefix = key.split(".mlp.experts.")[0] + ".mlp.experts"
            gate, up, down = model.get_submodule(prefix).stacked_weights()
            state[prefix + ".gate_up_proj"] = torch.cat((gate, up), dim=1).detach().clone()
            state[prefix + ".down_proj"] = down.detach().clone()
        else:
            state[key] = value.detach().clone()
    return state


# ---------------------------------------------------------------------------- config.json <-> MoSTConfig
# (plain dicts: no transformers needed; used by most_lightning.model.checkpoint for import and export)
DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM",)
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


def _hf_rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from either the original ``rope_theta`` + ``rope_scaling`` fields or
    transformers 5's ``rope_parameters``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        return theta, None
    if kind not in ("yarn", "llama3"):
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (yarn and llama3 are)")
    return theta, {"type": kind, **params}


def _require(hf: dict, source: str, field: str, allowed) -> None:
    value = hf.get(field, allowed[0])
    if value not in allowed:
        raise ValueError(f"{source}: {field}={value!r} is not supported by MoST's decoder (allowed: {list(allowed)})")


def _model_type_check(hf: dict, source: str, model_type: str, architectures: tuple[str, ...], hint: str) -> None:
    found = hf.get("model_type")
    archs = hf.get("architectures") or []
    if found != model_type and not set(archs) & set(architectures):
        raise ValueError(f"{source}: model_type={found!r} (architectures {archs}) is not {model_type}; {hint}")


def most_fields_from_hf_deepseek(hf: dict, source: str = "config.json") -> tuple[dict, dict]:
    """(MoSTConfig fields, router fields) of a DeepSeek-V2 / V2-Lite ``config.json`` (original DeepSeek or
    transformers format). Raises ValueError naming the field for what our decoder cannot represent."""
    _model_type_check(hf, source, "deepseek_v2", DEEPSEEK_ARCHITECTURES,
                      "a Llama checkpoint is upcycled with model.init.upcycle_from=<dir>, not imported")
    _require(hf, source, "hidden_act", ("silu",))
    _require(hf, source, "attention_bias", (False,))
    _require(hf, source, "mlp_bias", (False,))
    _require(hf, source, "scoring_func", ("softmax",))
    _require(hf, source, "moe_layer_freq", (1,))
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise ValueError(f"{source}: num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={heads}; "
                         "MLA has one latent for all heads")
    theta, scaling = _hf_rope(hf, source)
    if scaling is not None and scaling["type"] != "yarn":
        raise ValueError(f"{source}: DeepSeek-V2 uses YaRN rope scaling, not {scaling['type']!r}")
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf["max_position_embeddings"], intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"], n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0, top_k=hf["num_experts_per_tok"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    router = dict(name="vanilla", renormalize=bool(hf.get("norm_topk_prob", False)),
                  routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    return fields, router


def most_fields_from_hf_llama(hf: dict, source: str = "config.json") -> dict:
    """MoSTConfig fields (attention, norms, rope, dense FFN width) of a Llama ``config.json``."""
    _model_type_check(hf, source, "llama", LLAMA_ARCHITECTURES,
                      "a DeepSeek-V2 checkpoint is imported with model.init.from_pretrained=<dir>")
    _require(hf, source, "hidden_act", ("silu",))
    _require(hf, source, "attention_bias", (False,))
    _require(hf, source, "mlp_bias", (False,))
    theta, scaling = _hf_rope(hf, source)
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, attention="gqa", num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf["max_position_embeddings"], intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def hf_deepseek_config_dict(c: MoSTConfig) -> dict:
    """The original DeepSeek-V2 ``config.json`` fields for an MLA MoST config (vanilla routing semantics);
    readable by transformers' DeepseekV2Config and by our importer."""
    if c.attention != "mla":
        raise ValueError(f"a DeepSeek-V2 config.json needs MLA attention; this config uses {c.attention!r}")
    rope_scaling = None
    if c.rope_scaling:
        rope_scaling = {("type" if k == "type" else k): v for k, v in c.rope_scaling.items()}
    return dict(
        architectures=list(DEEPSEEK_ARCHITECTURES), model_type="deepseek_v2", vocab_size=c.vocab_size,
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads, n_shared_experts=c.n_shared_experts,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.top_k, routed_scaling_factor=c.router.routed_scaling_factor,
        first_k_dense_replace=c.first_k_dense_replace, moe_layer_freq=1, kv_lora_rank=c.kv_lora_rank,
        q_lora_rank=c.q_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, rope_theta=c.rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
        attention_bias=False, topk_method="greedy", scoring_func="softmax", norm_topk_prob=c.router.renormalize,
        aux_loss_alpha=c.router.balance_loss_alpha, seq_aux=True, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, torch_dtype="float32",
    )
