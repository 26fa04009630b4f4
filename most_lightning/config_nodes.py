"""Config nodes that Hydra composes from Python defaults, so that every default lives in one place.

``router/base`` holds the settings every router has (``RouterConfig``); the files in conf/router build on it
(``defaults: [base]``) and add the router's name or ``_target_`` and what they change. The node is open
(not struct): fields of a router's own config class can be set on the command line without ``+``, and a
misspelt one is refused by ``router_config``, naming the field and the router class.

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
    from most_lightning.model.config import RouterConfig

    store = ConfigStore.instance()
    router = {f.name: f.default for f in dataclasses.fields(RouterConfig) if f.name != "name"}
    store.store(group="router", name="base", node=OmegaConf.create(router, flags={"struct": False}),
                provider="most_lightning")
    lit = dict(optimizer=settings.OPTIMIZER, scheduler=settings.SCHEDULER, evaluation=settings.EVALUATION,
               expert_load_every_n_steps=None)  # None: trainer.log_every_n_steps
    store.store(group="lit", name="base", node=OmegaConf.create(lit), provider="most_lightning")
