"""Make sure Hydra knows hydra/sweeper=most_optuna however the project was installed.

Hydra 1.3 finds plugins by listing the `hydra_plugins` namespace package with pkgutil. That works when the
repository root is on sys.path (running `python run.py`, or pytest from the root) and for regular installs, but
setuptools' PEP 660 editable installs expose packages through an import hook that pkgutil cannot list
(hydra issue 3252): the module is importable, just not discoverable. Importing and registering it explicitly
covers that case; registering twice is harmless.
"""

from __future__ import annotations


def register_sweeper_plugin() -> bool:
    """Import and register the sweeper; False (and nothing registered) if hydra_plugins is not importable."""
    try:
        from hydra_plugins.most_optuna_sweeper.sweeper import MostOptunaSweeper
    except ImportError:
        return False
    from hydra.core.plugins import Plugins

    Plugins.instance().register(MostOptunaSweeper)
    return True
