"""Studies built on the library: Optuna search spaces and the ask-and-tell sweep loop behind the Hydra sweeper
plugin (hydra_plugins/most_optuna_sweeper), the quick objective used to test sweeps, and the results summariser
(`python -m most_lightning.experiments.summarize`)."""
