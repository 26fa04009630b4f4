"""Config nodes that Hydra composes from dataclasses, so that their defaults live in the dataclass only.

``router/base`` holds the settings every router has (``RouterConfig``); the files in conf/router build on it
(``defaults: [base]``) and add the router's name or ``_target_`` and what they change. The node is open
(not struct): fields of a router's own config class can be set on the command line without ``+``, and a
misspelt one is refused by ``router_config``, naming the field and the router class.

Call ``register_config_nodes()`` before Hydra composes a config (run.py does; so does the tests' compose).
"""

from __future__ import annotations

import dataclasses


def register_config_nodes() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from most_lightning.model.config import RouterConfig

    base = {f.name: f.default for f in dataclasses.fields(RouterConfig) if f.name != "name"}
    ConfigStore.instance().store(group="router", name="base", node=OmegaConf.create(base, flags={"struct": False}),
                                 provider="most_lightning")
