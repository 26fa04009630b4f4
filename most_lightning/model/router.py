"""Routers: hidden states + per-token modality in; weights, expert ids, aux losses and stats out.

A router is a ``Router`` subclass with a config dataclass of its own (``Router.Config``, extending
``RouterConfig``). A Hydra node picks it by ``_target_`` (the class's dotted path: any importable module, no
registration needed) or by a name registered with ``@register_router``; ``router_config`` turns the node into
the class's config and refuses unknown fields by name. The MoE layer only sees the ``Router`` interface.

Hooks a router may extend (docs/ablations_and_sweeps.md, "Adding a router"):
- ``select``: fp32 gate logits + modality -> weights, expert ids, scores for the balance loss;
- ``init_buffers``: rebuild non-persistent buffers, after construction and after meta-device
  materialisation (``to_empty`` leaves them uninitialised; one left stale is an error at start-up);
- ``reset_state``: initialise router-owned parameters and persistent buffers besides the gate weight (what a
  pretrained checkpoint does not hold; the import and upcycling plans call it and report it);
- ``after_optimizer_step``: per-step state, called by the LitModule after every optimizer step.

The gate itself (a bias-free linear map hidden -> experts, computed in fp32) is shared by all strategies, so
checkpoints load into any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from most_lightning.model.config import RETIRED_ROUTER_FIELDS, ConfigError, MoSTConfig, RouterConfig
from most_lightning.model.packing import segment_starts
from most_lightning.model.partition import ExpertPartition, expert_partition

log = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over data-parallel ranks


@dataclass
class RouterStats:
    """Detached routing statistics of one MoE layer for one batch.

    load[m, e]: fraction of modality m's tokens that chose expert e (each row sums to top_k, or 0 when the
    batch has no token of that modality); tokens[m]: number of tokens of modality m.
    """

    load: torch.Tensor
    tokens: torch.Tensor


@dataclass
class Routing:
    weights: torch.Tensor  # [N, k] fp32 gate weights of the chosen experts
    indices: torch.Tensor  # [N, k] long expert ids
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already weighted by their coefficients
    stats: RouterStats | None = None

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return sum(self.aux_losses.values()) if self.aux_losses else None


ROUTERS: dict[str, type["Router"]] = {}


def register_router(name: str) -> Callable[[type["Router"]], type["Router"]]:
    """Give a Router class a short name (``router=...`` files and ``router.name`` may use it)."""

    def add(cls: type["Router"]) -> type["Router"]:
        old = ROUTERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"router {name!r} is registered twice ({old.__qualname__} and {cls.__qualname__})")
        ROUTERS[name] = cls
        return cls

    return add


class UnknownRouterError(ConfigError):
    """A router name or _target_ that names no Router class."""


def _unknown_router(spec: Any, why: str = "") -> UnknownRouterError:
    return UnknownRouterError(
        f"router {spec!r} is not a known router{why}; registered names: {', '.join(sorted(ROUTERS))} "
        "(router=<name> or router.name=<name>); for a class of your own give router._target_=<module.Class> "
        "(a Router subclass) or register a name with @register_router(\"name\")")


def router_class(spec: str) -> type["Router"]:
    """The Router class of a registered name or a dotted class path (imported on demand)."""
    if isinstance(spec, str) and spec in ROUTERS:
        return ROUTERS[spec]
    if not isinstance(spec, str) or "." not in spec:
        raise _unknown_router(spec)
    module, _, attr = spec.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise _unknown_router(spec, f" (cannot import it: {err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise _unknown_router(spec, " (it is not a Router subclass)")
    return cls


def router_spec(cls: type["Router"]) -> str:
    """How a config names ``cls``: its registered name, else its dotted path."""
    for name, registered in ROUTERS.items():
        if registered is cls:
            return name
    return f"{cls.__module__}.{cls.__qualname__}"


def router_config(node: Any) -> RouterConfig:
    """The router's own config from a RouterConfig, a dict or a Hydra node (``_target_`` or ``name`` plus
    fields). Unknown fields are refused, naming them and the router class."""
    if isinstance(node, RouterConfig):
        cls = router_class(node.name)
        if type(node) is cls.Config:
            return node
        values = {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.init}
    elif isinstance(node, Mapping) or hasattr(node, "items"):
        values = _plain(node)
    else:
        raise ConfigError(f"router config must be a mapping with _target_ or name, got {type(node).__name__}")
    target, name = values.pop("_target_", None), values.pop("name", None)
    if target is None and name is None:
        raise ConfigError("the router config names no router: give router._target_=<module.Class> or "
                          f"router.name=<one of {', '.join(sorted(ROUTERS))}>")
    cls = router_class(target if target is not None else name)
    if target is not None and name is not None and name != router_spec(cls):
        # router=<file> router._target_=<class>: the class given on top of a file's name is the one meant
        log.warning(f"router._target_={target} replaces router.name={name}")
    fields = sorted(f.name for f in dataclasses.fields(cls.Config) if f.init and f.name != "name")
    values = _without_retired_router_fields(values, set(fields), cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"router field(s) {', '.join(unknown)}: not a setting of {cls.__qualname__} "
                          f"({cls.__module__}); its settings are {', '.join(fields)}")
    return cls.Config(name=router_spec(cls), **values)


def router_label(node: Any) -> str:
    """The name a run is known by (summaries, logs): the class's registered name or dotted path. A node's
    ``_target_`` wins over its ``name`` (``router=modality_aware router._target_=X`` is X's run)."""
    values = node if isinstance(node, Mapping) else _plain(node)
    spec = values.get("_target_") or values.get("name")
    return router_spec(router_class(spec))


def labelled_router_node(node: Any) -> dict[str, Any]:
    """The router node with ``name`` set to ``router_label``, so that a saved config names the router that
    ran, not the name of the file a ``_target_`` override was given on top of."""
    values = _plain(node)
    if values.get("_target_") is not None:
        values["name"] = router_label(values)
    return values


_noticed_retired: set[tuple[str, str]] = set()


def _without_retired_router_fields(values: dict[str, Any], fields: set[str], cls: type) -> dict[str, Any]:
    """``values`` without the RETIRED_ROUTER_FIELDS that ``cls`` does not have and that hold their old default,
    each with a one-line notice."""
    kept = dict(values)
    for name, (old_default, why) in RETIRED_ROUTER_FIELDS.items():
        if name not in fields and name in kept and kept[name] == old_default:
            value = kept.pop(name)
            if (cls.__qualname__, name) not in _noticed_retired:
                _noticed_retired.add((cls.__qualname__, name))
                log.warning("router.%s=%r ignored: %s has no such setting (%s)", name, value, cls.__qualname__, why)
    return kept


def _plain(node: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return dict(node.items())


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                 segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence balance loss of the reference (docs/model_spec.md section 2.3), without its alpha.

    scores [B, T, E]: the (masked) routing probabilities; indices [B, T, k]. For sequence b and expert i,
    f = count of i in the top-k over T tokens / (T * k / E), P = mean over tokens of the scores; the loss is
    mean_b sum_i f * P. E counts all routed experts, not the group size.
    segment_ids [B, T] (packed rows): every example of a row is a sequence of its own; segment 0 (the padding
    after the last example) belongs to none.
    """
    batch, tokens, _ = scores.shape
    if segment_ids is None:
        sequence, n_sequences = torch.arange(batch, device=scores.device).repeat_interleave(tokens), batch
    else:  # number the examples 1, 2, ... across the batch, the padding 0 (sizes fixed: no host sync)
        real = segment_ids > 0
        starts = real & segment_starts(segment_ids)
        sequence, n_sequences = (starts.reshape(-1).cumsum(0) * real.reshape(-1)), batch * tokens + 1
    length = torch.zeros(n_sequences, device=scores.device, dtype=scores.dtype)
    length.index_add_(0, sequence, torch.ones_like(sequence, dtype=scores.dtype))
    counts = torch.zeros(n_sequences, n_experts, device=scores.device, dtype=scores.dtype)
    slots = sequence.repeat_interleave(top_k) * n_experts + indices.reshape(-1)
    counts.view(-1).index_add_(0, slots, torch.ones_like(slots, dtype=scores.dtype))
    score_sums = torch.zeros_like(counts).index_add_(0, sequence, scores.reshape(-1, n_experts))
    present = length > 0
    if segment_ids is not None:
        present[0] = False  # the padding
    length = length.clamp(min=1)[:, None]
    per_sequence = (counts / (length * top_k / n_experts) * score_sums / length).sum(dim=1)
    return (per_sequence * present).sum() / present.sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of the gate logits."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_stats(indices: torch.Tensor, modality: torch.Tensor, n_experts: int,
                  token_mask: torch.Tensor | None = None) -> RouterStats:
    """Fraction of each modality's tokens sent to each expert; masked-out (padding) tokens are ignored."""
    with torch.no_grad():
        modality = modality.reshape(-1).long()
        indices = indices.reshape(modality.numel(), -1)
        keep = (torch.ones_like(modality, dtype=torch.float) if token_mask is None
                else token_mask.reshape(-1).float())
        # index_add with 0/1 weights, not boolean indexing + bincount: no host sync on a GPU
        slots = (modality[:, None] * n_experts + indices).reshape(-1)
        counts = torch.zeros(2 * n_experts, device=keep.device).index_add_(
            0, slots, keep.repeat_interleave(indices.shape[1])).view(2, n_experts)
        tokens = torch.zeros(2, device=keep.device).index_add_(0, modality, keep)
        return RouterStats(load=counts / tokens.clamp(min=1)[:, None], tokens=tokens)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast would run the gate's F.linear in bf16/fp16 whatever its inputs' dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Router(nn.Module):
    """Gate + a routing rule. Subclasses implement ``select`` and may extend the hooks (module docstring)."""

    Config: ClassVar[type[RouterConfig]] = RouterConfig
    uses_partition: ClassVar[bool] = False  # True: receives the text/audio expert partition (self.group_mask)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, RouterConfig)
                and dataclasses.is_dataclass(cls.Config)):
            raise TypeError(f"{cls.__qualname__}.Config must be a dataclass extending RouterConfig")

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, cfg: RouterConfig,
                 partition: ExpertPartition | None = None):
        super().__init__()
        self.n_experts, self.top_k, self.cfg = n_experts, top_k, cfg
        self.partition = partition
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        if self.uses_partition:
            if partition is None:
                raise ValueError(f"router {cfg.name!r} needs an expert partition")
            self.register_buffer("group_mask", torch.empty(2, n_experts, dtype=torch.bool), persistent=False)

    @classmethod
    def from_config(cls, config: MoSTConfig) -> "Router":
        partition = None
        if cls.uses_partition:
            partition = expert_partition(config.n_routed_experts, config.audio_expert_fraction, config.top_k,
                                         config.partition)
        router = cls(config.hidden_size, config.n_routed_experts, config.top_k, config.router, partition)
        init_router_buffers(router)
        return router

    # ------------------------------------------------------------------ hooks
    def init_buffers(self) -> None:
        """(Re)build the non-persistent buffers. Called after construction and after meta-device
        materialisation, where ``to_empty`` leaves them uninitialised."""
        if self.uses_partition:
            self.group_mask = self.partition.group_mask().to(self.group_mask.device)

    def reset_parameters(self, std: float) -> None:
        """The gate ~ normal(0, std) (the HF DeepSeek init), then the router's own state."""
        with torch.no_grad():
            nn.init.normal_(self.weight, std=std)
            self.reset_state()

    def reset_state(self) -> None:
        """Initialise the parameters and persistent buffers besides the gate weight (``owned_state_names``):
        what a pretrained checkpoint does not hold. The base router has none."""

    def owned_state_names(self) -> list[str]:
        """State-dict names (relative to the router) of the tensors ``reset_state`` initialises."""
        return [name for name in self.state_dict(keep_vars=True) if name != "weight"]

    def after_optimizer_step(self, reduce: Reduce | None = None) -> None:
        """Update per-step state after an optimizer step (not at gradient-accumulation micro-steps).
        ``reduce`` sums a tensor over data-parallel ranks (None: one process): state that decides the routing
        must stay the same on every rank."""

    def ranking(self, scores: torch.Tensor) -> torch.Tensor:
        """The values top-k ranks to choose experts: the scores; a bias-balanced router adds its bias here
        (selection only, never the gate weights)."""
        return scores

    def select(self, logits: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [N, E] fp32, modality [N] -> (weights [N, k], indices [N, k], scores for the balance loss)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
    def forward(self, hidden: torch.Tensor, modality: torch.Tensor, token_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> Routing:
        """hidden [B, T, H], modality [B, T] (0 text, 1 audio), token_mask [B, T] (stats only), segment_ids [B, T]
        (packed rows: the balance loss takes each example as a sequence)."""
        batch, tokens, hidden_size = hidden.shape
        with _autocast_off(hidden.device.type):  # fp32 logits also in mixed-precision training
            logits = F.linear(hidden.reshape(-1, hidden_size).float(), self.weight.float())
        weights, indices, scores = self.select(logits, modality.reshape(-1))
        if self.cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        weights = weights * self.cfg.routed_scaling_factor

        aux: dict[str, torch.Tensor] = {}
        if self.cfg.balance_loss_alpha > 0 and self.training:
            aux["balance"] = self.cfg.balance_loss_alpha * balance_loss(
                scores.view(batch, tokens, -1), indices.view(batch, tokens, -1), self.n_experts, self.top_k,
                segment_ids)
        if self.cfg.z_loss_coef > 0 and self.training:
            aux["z"] = self.cfg.z_loss_coef * z_loss(logits)
        stats = routing_stats(indices, modality, self.n_experts, token_mask)
        return Routing(weights=weights, indices=indices, aux_losses=aux, stats=stats)


def init_router_buffers(router: Router) -> None:
    """Run ``router.init_buffers()`` and check that it rebuilt every non-persistent buffer (a stale one would
    hold whatever memory ``to_empty`` left there)."""
    before = {(id(module), name): (module, name, buffer, buffer._version)
              for module in router.modules() for name, buffer in module._buffers.items()
              if buffer is not None and name in module._non_persistent_buffers_set}
    router.init_buffers()
    stale = [name for module, name, buffer, version in before.values()
             if module._buffers.get(name) is buffer and buffer._version == version]
    if stale:
        cls = type(router).__qualname__
        raise ConfigError(f"router {router.cfg.name!r} ({cls}) leaves its non-persistent buffer(s) {stale} "
                          f"uninitialised after meta-device materialisation: rebuild them in {cls}.init_buffers()")


def routers(model: nn.Module) -> Iterator[tuple[str, Router]]:
    """(state-dict prefix, router) of every router in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Router):
            yield name, module


def routers_after_optimizer_step(model: nn.Module, reduce: Reduce | None = None) -> None:
    for _, router in routers(model):
        router.after_optimizer_step(reduce)


@register_router("vanilla")
class VanillaRouter(Router):
    """DeepSeek-V2 gate: softmax over all experts, greedy top-k, modality ignored."""

    def select(self, logits, modality):
        scores = logits.softmax(dim=-1)
        _, indices = torch.topk(self.ranking(scores), self.top_k, dim=-1)
        return scores.gather(1, indices), indices, scores


@dataclass
class ModalityAwareConfig(RouterConfig):
    # "probs" zeroes out-of-group probabilities after a softmax over all experts (reference); "logits" masks
    # logits with -inf before the softmax (in-group softmax).
    mask: str = "probs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask not in ("probs", "logits"):
            raise ConfigError(f"router.mask={self.mask!r}: allowed values are 'probs' (reference) and 'logits'")


@register_router("modality_aware")
class ModalityAwareRouter(Router):
    """MAMoE (docs/model_spec.md section 2.2): each token may only use its own modality's group.

    mask="probs" (reference): softmax over ALL experts, zero the out-of-group probabilities, top-k; the gate
    weights are the raw full-softmax probabilities (sum < 1). mask="logits": -inf on out-of-group logits
    before the softmax, i.e. an in-group softmax.
    """

    Config = ModalityAwareConfig
    uses_partition = True

    def select(self, logits, modality):
        allowed = self.group_mask[modality.long()]  # [N, E]
        if self.cfg.mask == "logits":
            scores = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        else:
            scores = logits.softmax(dim=-1).masked_fill(~allowed, 0.0)
        # Rank out-of-group experts below every in-group one, even if an in-group probability underflows to 0.
        _, indices = torch.topk(self.ranking(scores).masked_fill(~allowed, float("-inf")), self.top_k, dim=-1)
        return scores.gather(1, indices), indices, scores


@dataclass
class AuxFreeConfig(RouterConfig):
    # per-step bias change: bias_e += rate * sign(mean load of e's group - load of e) (DeepSeek-V3's gamma)
    bias_update_rate: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias_update_rate < 0:
            raise ConfigError(f"router.bias_update_rate={self.bias_update_rate} must be >= 0 (0 freezes the bias)")


class BiasBalancing(Router):
    """Auxiliary-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the scores that top-k
    ranks, never to the gate weights. After each optimizer step an expert that got more than the mean load of
    its group (all experts, or its modality's group under modality-aware routing) loses ``bias_update_rate``,
    one that got less gains it. The bias is a persistent buffer: checkpoints and resumed runs keep it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("expert_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # this step's token count per expert; a plain tensor, not a buffer, so that DDP never broadcasts it
        self._step_load: torch.Tensor | None = None

    def reset_state(self) -> None:
        self.expert_bias.zero_()

    def ranking(self, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.expert_bias.to(scores.dtype)

    def forward(self, hidden, modality, token_mask=None, segment_ids=None) -> Routing:
        routing = super().forward(hidden, modality, token_mask, segment_ids)
        if self.training:
            counts = (routing.stats.load * routing.stats.tokens[:, None]).sum(0).round()
            self._step_load = counts if self._step_load is None else self._step_load + counts
        return routing

    @torch.no_grad()
    def after_optimizer_step(self, reduce: Reduce | None = None) -> None:
        load = self._step_load
        self._step_load = None
        if load is None:
            return
        if reduce is not None:
            load = reduce(load)
        if self.uses_partition:  # compare each expert with its own group (each expert is in exactly one)
            groups = self.group_mask.to(load.dtype)  # [2, E]
            group_mean = (groups @ load) / groups.sum(dim=1).clamp(min=1)
            mean = (groups * group_mean[:, None]).sum(dim=0)
        else:
            mean = load.mean().expand_as(load)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(mean - load).to(self.expert_bias.dtype)


@register_router("aux_free")
class AuxFreeRouter(BiasBalancing, VanillaRouter):
    """Vanilla routing balanced by a per-expert selection bias instead of (or besides) the balance loss."""

    Config = AuxFreeConfig


@dataclass
class ModalityAwareAuxFreeConfig(AuxFreeConfig, ModalityAwareConfig):
    pass


@register_router("modality_aware_aux_free")
class ModalityAwareAuxFreeRouter(BiasBalancing, ModalityAwareRouter):
    """Modality-aware routing, each modality's group balanced by the selection bias."""

    Config = ModalityAwareAuxFreeConfig


def build_router(config: MoSTConfig) -> Router:
    return router_class(config.router.name).from_config(config)
