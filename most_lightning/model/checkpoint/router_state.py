"""Router-owned tensors in the import and upcycling plans.

Besides its gate weight a router may own parameters and persistent buffers (e.g. the aux-loss-free
balancing bias). A pretrained DeepSeek-V2 or Llama checkpoint does not hold them: they are initialised by the
router's ``reset_state()`` and reported as such in the load report, never left at random. Our own exports hold
them and reload them as they are.
"""

from __future__ import annotations

from most_lightning.model.checkpoint.files import CheckpointDir
from most_lightning.model.checkpoint.loader import Assign, LoadPlan
from most_lightning.model.router import routers


def router_state_names(model) -> set[str]:
    """Full state-dict names of every router-owned tensor besides the gate weights."""
    return {f"{prefix}.{name}" for prefix, router in routers(model) for name in router.owned_state_names()}


def plan_router_state(plan: LoadPlan, model, ckpt: CheckpointDir, tensors: dict) -> None:
    """Load each router's own tensors when the checkpoint holds all of them, else initialise them by rule."""
    have = ckpt.tensors_info
    for prefix, router in routers(model):
        keys = [f"{prefix}.{name}" for name in router.owned_state_names()]
        if not keys:
            continue
        if all(k in have for k in keys):
            for k in keys:
                plan.add(k, tuple(tensors[k].shape), Assign(k))
            continue
        how = f"initialised by the router ({type(router).__qualname__}.reset_state)"
        for k in keys:
            plan.by_rule[k] = (None, how)
        plan.ignore += tuple(k for k in keys if k in have)  # a partial set is not mixed with the rule's values
        plan.rules.append(lambda _tensors, router=router: router.reset_state())
