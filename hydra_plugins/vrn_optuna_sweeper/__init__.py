"""``hydra/sweeper=vrn_optuna``: a Hydra sweeper plugin that searches hyperparameters with Optuna
(ask-and-tell, TPE by default, the study kept in sqlite so a stopped sweep resumes).

Generic: it knows Hydra, OmegaConf and Optuna, not the ``vrn`` package. Modules: ``config``
(the ConfigStore entry), ``search_space`` (sweep override syntax -> Optuna distributions),
``sweeper`` (the ask / launch / tell loop). Usage: docs/sweeps.md.
"""
