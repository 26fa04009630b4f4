"""Training strategies from `conf/strategy`: DDP, DeepSpeed ZeRO-2 (+ CPU optimizer offload) and ZeRO-3.

One function, `build_strategy`, turns the `strategy` group (plus the trainer and data groups it must agree with)
into what `lightning.Trainer(strategy=...)` takes, after checking at start-up what would otherwise fail late or
silently: a precision DeepSpeed cannot run, a global batch that does not divide into micro-batch x devices x
nodes x accumulation, more devices than the processes an outside launcher started, and a multirun whose
workers Lightning would start by re-running the command line (and so the whole sweep).

`CPUDeepSpeedStrategy` runs the real DeepSpeed engine on CPU processes over gloo, so tests and CI exercise the
same ZeRO code paths as a GPU cluster; Lightning's own DeepSpeedStrategy refuses anything but CUDA.
The model never calls torch.distributed: everything distributed lives in the strategy.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("most_lightning.strategy")

STRATEGY_KINDS = ("auto", "ddp", "ddp_spawn", "deepspeed")
# what Lightning's DeepSpeed precision plugin accepts; the CPU accelerator of DeepSpeed has no fp16
DEEPSPEED_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
DEEPSPEED_CPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
# the MoE block is one ZeRO-3 leaf: its experts and router are gathered together on entry, whatever the routing
MOE_LEAF_MODULE = "most_lightning.model.moe.MoELayer"


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ---------------------------------------------------------------------------------------------- CPU DeepSpeed
@functools.cache
def _deepspeed_class():
    """Defined lazily: importing Lightning's DeepSpeed module is not free, and `--help` must stay instant."""
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.trainer.states import TrainerFn

    class MoSTDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeedStrategy, except that testing/validating a ZeRO-3 checkpoint outside a fit works:
        DeepSpeed 0.19.8's inference engine cannot load ZeRO-3 partitions (it calls an optimizer method its
        parameter-offload object lacks, and would skip the weights), so the shards are consolidated to fp32
        and loaded into the gathered parameters, as Lightning does for a single-file checkpoint."""

        _consolidated = False

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            from most_lightning.model.checkpoint.deepspeed_dir import consolidate, is_deepspeed_checkpoint

            fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
            self._consolidated = self.zero_stage_3 and not fitting and is_deepspeed_checkpoint(checkpoint_path)
            if self._consolidated:
                return consolidate(checkpoint_path)
            return super().load_checkpoint(checkpoint_path, weights_only)

        def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
            if self._consolidated:
                self.model_to_device()
                self._restore_zero_state(checkpoint, strict=strict)
                return
            super().load_model_state_dict(checkpoint, strict)

    return MoSTDeepSpeedStrategy


@functools.cache
def _cpu_deepspeed_class():
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.fabric.utilities.seed import reset_seed

    class CPUDeepSpeedStrategy(_deepspeed_class()):
        """Lightning's DeepSpeedStrategy on CPU processes (gloo). Three things differ from the CUDA one:
        the environment is set up as DDP's (no CUDA-only check), the distributed setup seeds, sets the ranks and
        starts DeepSpeed's backend without validating CUDA device indices, and the root device carries the
        local rank as its index because DeepSpeed's engine reads its device rank from it."""

        strategy_name = "deepspeed_cpu"

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self):
            import torch

            return torch.device("cpu", self.local_rank)

    return CPUDeepSpeedStrategy


def __getattr__(name: str) -> Any:
    if name == "CPUDeepSpeedStrategy":
        return _cpu_deepspeed_class()
    if name == "MoSTDeepSpeedStrategy":
        return _deepspeed_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def deepspeed_config(strategy: Mapping[str, Any], trainer: Mapping[str, Any], micro_batch: int | None) -> dict:
    """The DeepSpeed config dict of a `strategy.kind=deepspeed` node: its `deepspeed` block plus the settings
    that must agree with the trainer. Gradient clipping is always written (DeepSpeed clips at 1.0 when it is
    absent); precision blocks are added by Lightning from trainer.precision; accumulation comes from the
    trainer (Lightning refuses it in the config)."""
    config = dict(_plain(strategy.get("deepspeed")) or {})
    if "gradient_accumulation_steps" in config:
        raise ValueError("strategy.deepspeed.gradient_accumulation_steps: set trainer.accumulate_grad_batches (or "
                         "strategy.global_batch_size) instead; Lightning passes it to DeepSpeed")
    if trainer.get("gradient_clip_algorithm", "norm") not in (None, "norm"):
        raise ValueError(f"trainer.gradient_clip_algorithm={trainer.get('gradient_clip_algorithm')!r}: DeepSpeed "
                         "clips by norm only; allowed value: 'norm'")
    config["gradient_clipping"] = float(trainer.get("gradient_clip_val") or 0.0)
    if micro_batch is not None:
        config.setdefault("train_micro_batch_size_per_gpu", int(micro_batch))
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        leaf = zero.setdefault("leaf_module", {})
        classes = list(leaf.get("classes") or [])
        if MOE_LEAF_MODULE not in classes:
            classes.append(MOE_LEAF_MODULE)
        leaf["classes"] = classes
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def offloads_optimizer(config: Mapping[str, Any] | None) -> bool:
    zero = (config or {}).get("zero_optimization") or {}
    return ((zero.get("offload_optimizer") or {}).get("device") or "none") != "none"


# ---------------------------------------------------------------------------------------------- batch arithmetic
@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int | None   # rows per device per forward (None: token-budget batches, rows vary)
    devices: int
    num_nodes: int
    accumulate: int

    @property
    def ranks(self) -> int:
        return self.devices * self.num_nodes

    @property
    def global_batch(self) -> int | None:
        return None if self.micro_batch is None else self.micro_batch * self.ranks * self.accumulate

    def describe(self) -> str:
        micro = "variable (token budget)" if self.micro_batch is None else str(self.micro_batch)
        total = "variable" if self.global_batch is None else str(self.global_batch)
        return (f"global batch {total} = micro-batch {micro} x devices {self.devices} x nodes {self.num_nodes} "
                f"x accumulation {self.accumulate}")


def _devices_count(devices: Any) -> int:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices)
    launched = _launched_local_processes()
    return launched or 1  # "auto" / -1: Lightning decides; outside a launcher the CPU runs one process


def batch_plan(strategy: Mapping[str, Any], trainer: Mapping[str, Any], data: Mapping[str, Any] | None) -> BatchPlan:
    """micro-batch x devices x nodes x accumulation; with strategy.global_batch_size set, the accumulation is
    derived from it and must divide exactly (an error names the settings and the batches that would divide)."""
    data = data or {}
    micro = data.get("batch_size") if data.get("batching", "fixed") == "fixed" else None
    devices, nodes = _devices_count(trainer.get("devices", 1)), int(trainer.get("num_nodes", 1) or 1)
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    wanted = strategy.get("global_batch_size")
    if wanted is None:
        return BatchPlan(micro, devices, nodes, accumulate)
    wanted = int(wanted)
    if micro is None:
        raise ValueError(f"strategy.global_batch_size={wanted} needs fixed-size batches (data.batching=fixed); "
                         f"with data.batching={data.get('batching')!r} the rows per batch vary: set "
                         "strategy.global_batch_size=null and trainer.accumulate_grad_batches instead")
    per_step = int(micro) * devices * nodes
    if wanted % per_step:
        below, above = (wanted // per_step) * per_step, (wanted // per_step + 1) * per_step
        micro_ok = [m for m in range(1, int(micro) + 1) if wanted % (m * devices * nodes) == 0]
        hint = (f"data.batch_size in {micro_ok[-3:]} divides it" if micro_ok else
                f"no data.batch_size divides it over {devices * nodes} ranks")
        raise ValueError(
            f"strategy.global_batch_size={wanted} does not divide into data.batch_size={micro} x trainer.devices="
            f"{devices} x trainer.num_nodes={nodes} = {per_step} rows per accumulation step; {hint}; or choose "
            f"strategy.global_batch_size={below or per_step} or {above}")
    derived = wanted // per_step
    if accumulate not in (1, derived):
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate} contradicts strategy.global_batch_size="
                         f"{wanted} (which needs {derived} = {wanted} / ({micro} x {devices} x {nodes})): set one "
                         "of them (the other to 1 / null)")
    return BatchPlan(int(micro), devices, nodes, derived)


# ---------------------------------------------------------------------------------------------- launch checks
def _launched_local_processes() -> int | None:
    """Processes per node started by an outside launcher (torchrun, srun), or None when not launched so."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    if os.environ.get("SLURM_NTASKS", "").isdigit() and os.environ.get("SLURM_NNODES", "").isdigit():
        return int(os.environ["SLURM_NTASKS"]) // max(int(os.environ["SLURM_NNODES"]), 1)
    return None


def launched_externally() -> bool:
    """True when every process was started by torchrun/srun: Lightning then never re-launches the script."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
    return world is not None and world.isdigit() and int(world) > 1


def is_multi_process(kind: str, trainer: Mapping[str, Any]) -> bool:
    if kind == "auto":
        name = str(trainer.get("strategy", "auto"))
        if name in ("auto", "single_device"):
            return False
    devices = _devices_count(trainer.get("devices", 1))
    return devices * int(trainer.get("num_nodes", 1) or 1) > 1


def check_launch(kind: str, trainer: Mapping[str, Any], multirun: bool) -> None:
    """Errors at start-up, before any data is prepared:
    - a Hydra multirun with a strategy whose workers Lightning starts by re-running the command line (DDP,
      DeepSpeed): each worker would run the whole sweep again; ddp_spawn forks instead and is allowed;
    - trainer.devices / trainer.num_nodes that disagree with the processes torchrun/srun started."""
    name = str(trainer.get("strategy", "auto")) if kind == "auto" else kind
    if multirun and is_multi_process(kind, trainer) and "spawn" not in name:
        raise ValueError(
            f"strategy {name!r} with trainer.devices={trainer.get('devices')} x trainer.num_nodes="
            f"{trainer.get('num_nodes', 1)} inside a multirun (-m): Lightning starts the other workers by "
            "re-running this command line, so each would re-enter the sweep. Run each job on its own with "
            "torchrun/srun (docs/scaling.md#launching), or use strategy=ddp_spawn on one node")
    launched = _launched_local_processes()
    if launched is None or not launched_externally():
        return
    devices = trainer.get("devices", 1)
    if isinstance(devices, (int, str)) and str(devices).isdigit() and int(devices) != launched:
        raise ValueError(
            f"trainer.devices={devices} but the launcher started {launched} process(es) on this node "
            f"(LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE): set trainer.devices={launched}, or start "
            f"{devices} processes per node (torchrun --nproc-per-node={devices}, srun --ntasks-per-node={devices})")
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS"))
    nodes = int(trainer.get("num_nodes", 1) or 1)
    if world != launched * nodes:
        raise ValueError(f"trainer.num_nodes={nodes} but the launcher started {world} processes, {launched} per "
                         f"node, i.e. {world // max(launched, 1)} node(s): set trainer.num_nodes="
                         f"{world // max(launched, 1)}")


def check_precision(kind: str, trainer: Mapping[str, Any]) -> None:
    if kind != "deepspeed":
        return
    precision = str(trainer.get("precision", "32-true"))
    allowed = DEEPSPEED_CPU_PRECISIONS if trainer.get("accelerator") == "cpu" else DEEPSPEED_PRECISIONS
    if precision not in allowed:
        where = " on the CPU (DeepSpeed's CPU accelerator has no fp16)" if trainer.get("accelerator") == "cpu" else ""
        raise ValueError(f"trainer.precision={precision!r} cannot run with a DeepSpeed strategy{where}; allowed "
                         f"values: {list(allowed)}")


def check_zero3_audio(kind: str, strategy: Mapping[str, Any], audio: Mapping[str, Any] | None) -> None:
    """ZeRO-3 partitions every parameter, the frozen MoST-C encoder's too, and gathers it at each call of each
    submodule; ranks encode different numbers of utterances (none on a text-only batch), so their gathers
    would not match. Refused until the encoder is kept out of ZeRO-3 (ZeRO-2, the paper's setting, is fine)."""
    stage = ((strategy.get("deepspeed") or {}).get("zero_optimization") or {}).get("stage")
    if kind == "deepspeed" and stage == 3 and (audio or {}).get("mode") == "continuous":
        raise ValueError("audio=continuous (MoST-C) with a ZeRO-3 strategy: ZeRO-3 would partition the frozen "
                         "audio encoder, and ranks call it a different number of times per step; use "
                         "strategy=deepspeed_zero2 or deepspeed_zero2_offload (the paper's setting)")


# ---------------------------------------------------------------------------------------------- the builder
def build_strategy(strategy: Mapping[str, Any] | None, trainer: Mapping[str, Any],
                   data: Mapping[str, Any] | None = None,
                   multirun: bool = False, ckpt_path: str | None = None,
                   audio: Mapping[str, Any] | None = None) -> tuple[Any, BatchPlan]:
    """The `strategy` group -> (what Trainer(strategy=...) takes, the batch plan). Checks the launch, the
    precision, the batch arithmetic and a sharded checkpoint to resume from (every shard present) first; logs
    which strategy runs and the global batch. A DeepSpeed checkpoint saved by another number of ranks is
    converted to DeepSpeed's universal format and loaded as such."""
    strategy = dict(_plain(strategy) or {"kind": "auto"})
    trainer = dict(_plain(trainer) or {})
    kind = strategy.get("kind", "auto")
    if kind not in STRATEGY_KINDS:
        raise ValueError(f"strategy.kind={kind!r}: allowed values are {list(STRATEGY_KINDS)}")
    if kind != "auto" and str(trainer.get("strategy", "auto")) != "auto":
        raise ValueError(f"trainer.strategy={trainer['strategy']!r} and strategy={strategy.get('name', kind)!r} "
                         "both choose a strategy: use one (strategy=<name> from conf/strategy, or trainer.strategy)")
    check_launch(kind, trainer, multirun)
    check_precision(kind, trainer)
    check_zero3_audio(kind, strategy, _plain(audio))
    plan = batch_plan(strategy, trainer, _plain(data))
    if ckpt_path is not None:
        strategy = resume_settings(kind, strategy, ckpt_path, plan.ranks)
    built = _build(kind, strategy, trainer, plan)
    log.info(f"strategy {strategy.get('name', kind)}: {_describe(built)}; {plan.describe()}")
    return built, plan


def resume_settings(kind: str, strategy: dict, ckpt_path: str, ranks: int) -> dict:
    """Check a sharded DeepSpeed checkpoint before anything starts (a missing shard is named); on another number
    of ranks than it was saved with, have it converted to the universal format and load it so."""
    from most_lightning.model.checkpoint.deepspeed_dir import is_deepspeed_checkpoint, universal_for_resume

    if not is_deepspeed_checkpoint(ckpt_path):
        return strategy
    if kind != "deepspeed":
        raise ValueError(f"ckpt_path={ckpt_path} is a sharded DeepSpeed checkpoint: resume it with a DeepSpeed "
                         "strategy (strategy=deepspeed_zero2 ...), or export it first "
                         "(python -m most_lightning.model.checkpoint export)")
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    if universal_for_resume(ckpt_path, ranks, rank):
        log.info(f"{ckpt_path} was saved by another number of ranks than {ranks}: resuming from its universal "
                 "conversion (DeepSpeed re-partitions weights and optimizer states)")
        config = dict(strategy.get("deepspeed") or {})
        config["checkpoint"] = {**(config.get("checkpoint") or {}), "load_universal": True}
        strategy = {**strategy, "deepspeed": config}
    return strategy


def _describe(built: Any) -> str:
    return built if isinstance(built, str) else type(built).__name__


def _build(kind: str, strategy: Mapping[str, Any], trainer: Mapping[str, Any], plan: BatchPlan) -> Any:
    options = dict(strategy.get("options") or {})
    if kind == "auto":
        return trainer.get("strategy", "auto")
    if kind in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        if kind == "ddp_spawn":
            options.setdefault("start_method", "spawn")
        return DDPStrategy(**options)
    config = deepspeed_config(strategy, trainer, plan.micro_batch)
    if trainer.get("accelerator") == "cpu":
        log.info("accelerator=cpu with a DeepSpeed strategy: using CPUDeepSpeedStrategy (the real DeepSpeed engine "
                 "on CPU processes over gloo; for tests and CI, not for speed)")
        return _cpu_deepspeed_class()(config=config, **options)
    return _deepspeed_class()(config=config, **options)
