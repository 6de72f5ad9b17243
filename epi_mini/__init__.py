"""epi-mini: a small, readable reference implementation of Evolving Parameter Isolation (EPI) for SFT.

Where things live: ``model.py`` (the tiny GPT), ``epi.py`` (the method and the static baselines),
``tasks.py`` and ``data.py`` (task families, schedules, batches), ``train.py`` (the training loop),
``metrics.py`` (forgetting, BWT, plasticity), ``experiments.py`` (the protocols over seeds).
"""
__version__ = "0.1.0"
