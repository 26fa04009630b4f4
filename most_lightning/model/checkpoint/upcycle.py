"""Dense-to-MoE upcycling of a Llama-style checkpoint (GQA, tied or untied embeddings, llama3 rope).

Attention, norms and embeddings are copied. In each MoE layer, the dense SwiGLU FFN (width I) is cut along its
intermediate dim into g = I / moe_intermediate_size equal SEGMENTS (g = 1: whole-FFN copies, "sparse
upcycling"; g > 1: finer experts). The first n_shared_experts segments form the shared expert (a SwiGLU of
width n_shared * moe_intermediate_size, as in the decoder); the routed experts are copies of the remaining
segments, round robin (expert m <- segment n_shared + m mod (g - n_shared)). Layers below
first_k_dense_replace stay dense and take the FFN as is (set model.intermediate_size to the checkpoint's).
The router gates are not in the checkpoint: ``router_init`` = normal(0, initializer_range) or zeros; other
router-owned tensors (e.g. a balancing bias) are initialised by their router (checkpoint/router_state.py).

When is the upcycled model the dense model (the identity, proven in tests against LlamaForCausalLM)?
A SwiGLU is a sum over its intermediate units, so FFN(x) = sum_s segment_s(x). The MoE layer computes
shared(x) + sum_j w_j * expert_{e_j}(x). If the routed experts are all copies of ONE segment (g - n_shared = 1:
g = 1 without shared experts, or e.g. g = 2 with one shared segment), this is
shared(x) + (sum_j w_j) * segment_last(x), i.e. exactly FFN(x) whenever the top-k weights of every token sum to
one. That needs the router to make them sum to one:
  - router.renormalize=true (any gate init, any router), or
  - router_init=zeros with the reference rule (softmax over all E experts, probabilities not renormalised):
    every probability is 1/E, the top-k sum is k/E, so router.routed_scaling_factor = E/k makes it one
    (modality_aware with mask=probs too; with mask=logits the in-group softmax gives 1/|group|, so the factor
    is |group|/k).
With g - n_shared > 1 segments in the routed experts, a token's output depends on which segments its top-k
picks: the upcycled model starts NEAR the dense one, not at it (``identity_at_init`` says which).
"""

from __future__ import annotations

import torch

from most_lightning.model.checkpoint.files import CheckpointDir, CheckpointError
from most_lightning.model.checkpoint.loader import Assign, LoadPlan, model_tensors
from most_lightning.model.checkpoint.router_state import plan_router_state
from most_lightning.model.checkpoint.vocab import plan_vocab_rows
from most_lightning.model.config import MoSTConfig
from most_lightning.model.decoder import MoSTForCausalLM

ROUTER_INITS = ("normal", "zeros")
IGNORED = ("*.rotary_emb.inv_freq",)


def segments(config: MoSTConfig, dense_width: int) -> tuple[int, list[int], list[int]]:
    """(segment width, segments of the shared expert, segment of each routed expert)."""
    width = config.moe_intermediate_size
    if dense_width % width:
        raise CheckpointError(
            f"upcycling cuts the dense FFN (intermediate_size {dense_width}) into experts of "
            f"model.moe_intermediate_size={width}, which must divide it (e.g. {dense_width}, {dense_width // 2}, "
            f"{dense_width // 4})")
    g = dense_width // width
    n_shared = config.n_shared_experts
    if n_shared > g:
        raise CheckpointError(f"model.n_shared_experts={n_shared} segments of width {width} exceed the dense FFN's "
                              f"{g} segments")
    left = list(range(n_shared, g)) or list(range(g))
    return width, list(range(n_shared)), [left[m % len(left)] for m in range(config.n_routed_experts)]


def identity_at_init(config: MoSTConfig, dense_width: int, router_init: str) -> tuple[bool, str]:
    """Whether the upcycled model computes exactly the dense model's function at init, and why (not)."""
    _, shared, routed = segments(config, dense_width)
    if len(set(routed)) > 1:
        return False, (f"routed experts come from {len(set(routed))} different FFN segments: the output depends on "
                       "which ones each token picks (set moe_intermediate_size so that one segment remains)")
    if config.n_shared_experts and shared and routed[0] in shared:
        return False, "the shared expert already holds the whole FFN; the routed experts add to it"
    r, k, e = config.router, config.top_k, config.n_routed_experts
    if r.renormalize:
        return True, "routed weights renormalised to sum to one"
    if router_init == "zeros":
        group = e
        if getattr(r, "mask", None) == "logits":
            group = round(e * (1 - config.audio_expert_fraction))  # text group; audio differs unless 0.5
        want = group / k
        if abs(r.routed_scaling_factor - want) < 1e-9:
            return True, f"zero gate: top-k probabilities sum to {k}/{group}, routed_scaling_factor={want:g}"
        return False, (f"zero gate: top-k weights sum to {k}/{group} * {r.routed_scaling_factor:g}; "
                       f"set router.routed_scaling_factor={want:g}")
    return False, "top-k weights do not sum to one: set router.renormalize=true (or router_init=zeros + scaling)"


def llama_upcycle_plan(model: MoSTForCausalLM, ckpt: CheckpointDir, router_init: str = "normal",
                       new_token_rows: str = "mean") -> LoadPlan:
    c = model.config
    if router_init not in ROUTER_INITS:
        raise CheckpointError(f"model.init.router_init={router_init!r}: allowed values are {list(ROUTER_INITS)}")
    dense_width = ckpt.config["intermediate_size"]
    plan = LoadPlan(ignore=IGNORED)
    tensors = model_tensors(model)
    if c.tie_word_embeddings:  # tied: some checkpoints still carry the duplicate head
        plan.ignore += ("lm_head.weight",)
    plan_router_state(plan, model, ckpt, tensors)  # a dense checkpoint holds none: initialised by the router
    width, shared, routed = segments(c, dense_width) if c.has_moe else (0, [], [])
    hidden = c.hidden_size

    def rows_of(segs: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(s * width, (s + 1) * width) for s in segs])

    for name, tensor in tensors.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            plan_vocab_rows(plan, name, name, (ckpt.config["vocab_size"], hidden), tensor.shape[0], new_token_rows,
                            c.initializer_range)
        elif ".mlp." not in name:
            plan.add(name, tuple(tensor.shape), Assign(name))
    for layer in range(c.num_layers):
        src = f"model.layers.{layer}.mlp"
        if not c.is_moe_layer(layer):
            if c.intermediate_size != dense_width:
                raise CheckpointError(f"dense layer {layer} keeps the checkpoint's FFN: set model.intermediate_size="
                                      f"{dense_width} (is {c.intermediate_size})")
            for p in ("gate_proj", "up_proj", "down_proj"):
                shape = (hidden, dense_width) if p == "down_proj" else (dense_width, hidden)
                plan.add(f"{src}.{p}.weight", shape, Assign(f"{src}.{p}.weight"))
            continue
        seg_rows = [rows_of([s]) for s in routed]
        experts = torch.arange(c.n_routed_experts)
        for p in ("gate_proj", "up_proj"):
            assigns = [Assign(f"{src}.experts.{p}", rows=experts,
                              take=lambda t, sr=seg_rows: torch.stack([t[r] for r in sr]))]
            if shared:
                sh = rows_of(shared)
                assigns.append(Assign(f"{src}.shared_experts.{p}.weight", take=lambda t, sh=sh: t[sh]))
            plan.add(f"{src}.{p}.weight", (dense_width, hidden), *assigns)
        assigns = [Assign(f"{src}.experts.down_proj", rows=experts,
                          take=lambda t, sr=seg_rows: torch.stack([t[:, r] for r in sr]))]
        if shared:
            sh = rows_of(shared)
            assigns.append(Assign(f"{src}.shared_experts.down_proj.weight", take=lambda t, sh=sh: t[:, sh]))
        plan.add(f"{src}.down_proj.weight", (hidden, dense_width), *assigns)
        gate = f"{src}.gate.weight"
        plan.by_rule[gate] = (None, f"router gate: {router_init}")

        def init_gate(ts, gate=gate):
            if router_init == "zeros":
                ts[gate].zero_()
            else:
                torch.nn.init.normal_(ts[gate], std=c.initializer_range)

        plan.rules.append(init_gate)
    if c.has_moe:
        exact, why = identity_at_init(c, dense_width, router_init)
        plan.notes.append(f"upcycled {dense_width}-wide FFN: segments of {width}, shared <- {shared}, routed experts <- "
                          f"segments {sorted(set(routed))}; identity with the dense model at init: {exact} ({why})")
    return plan
