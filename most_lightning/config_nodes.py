"""Config nodes that Hydra composes from Python defaults, so that every default lives in one place.

``router/base`` holds the settings every router has (``RouterConfig``); the files in conf/router build on it
(``defaults: [base]``) and add the router's name or ``_target_`` and what they change. The node is open
(not struct): fields of a router's own config class can be set on the command line without ``+``, and a
misspelt one is refused by ``router_config``, naming the field and the router class.

``model/preset_<name>`` holds every MoSTConfig field at the value of the Python preset <name>
(most_lightning/model/config.py: the preset's values, the dataclass defaults for the rest), plus the ``init``
node's defaults (most_lightning/model/checkpoint/init.py); conf/model/<name>.yaml builds on it and adds only
what differs. Every field shows in ``--cfg job`` and is set without ``+`` (``model.hidden_size=64``); the
node stays struct, so a misspelt field is refused when the config is composed.

``lit/base`` holds the LitModule's optimiser, schedule and evaluation settings (most_lightning/lit/settings.py);
conf/lit/default.yaml builds on it.

Call ``register_config_nodes()`` before Hydra composes a config (run.py does; so does the tests' compose).
"""

from __future__ import annotations

import dataclasses


def register_config_nodes() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from most_lightning.lit import settings
    from most_lightning.model.config import PRESETS, RouterConfig

    store = ConfigStore.instance()
    router = {f.name: f.default for f in dataclasses.fields(RouterConfig) if f.name != "name"}
    for preset in PRESETS:
        store.store(group="model", name=f"preset_{preset}", node=OmegaConf.create(model_group(preset)),
                    provider="most_lightning")
    store.store(group="router", name="base", node=OmegaConf.create(router, flags={"struct": False}),
                provider="most_lightning")
    lit = dict(optimizer=settings.OPTIMIZER, scheduler=settings.SCHEDULER, evaluation=settings.EVALUATION,
               expert_load_every_n_steps=None)  # None: trainer.log_every_n_steps
    store.store(group="lit", name="base", node=OmegaConf.create(lit), provider="most_lightning")


def model_group(preset: str) -> dict:
    """The model group of a Python preset: every MoSTConfig field a user may set (not the vocabulary, which the
    tokenizer fixes, nor the router, which has a group of its own), and the ``init`` node."""
    from most_lightning.model.checkpoint.init import INIT_DEFAULTS
    from most_lightning.model.config import PRESETS, MoSTConfig

    fields = {f.name: f.default for f in dataclasses.fields(MoSTConfig) if f.name not in ("vocab_size", "router")}
    return {"preset": preset, **fields, **{k: v for k, v in PRESETS[preset].items() if k in fields},
            "init": dict(INIT_DEFAULTS)}
