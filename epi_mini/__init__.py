"""epi-mini: a small, readable reference implementation of Evolving Parameter Isolation (EPI) for SFT.

Read the files in the order of the course:

1. ``model.py`` (the tiny GPT) and ``tokenizer.py``;
2. ``tasks.py`` and ``data.py`` (task families, schedules, batches), ``evaluate.py`` (held-out scores);
3. ``train.py`` (the training loop), ``strategy.py`` (what the loop asks of a method, one SFT step),
   ``metrics.py`` (forgetting, BWT, plasticity, statistics over seeds);
4. ``drift.py`` (importance drift, measured);
5. ``baselines.py`` (CPI-FT: static isolation);
6. ``epi.py`` (the method), ``adaptive.py`` (``mask_interval="auto"``), ``compact.py`` (packed state);
7. ``methods.py`` (every method by name, and yours from a file: ``FILE.py:CLASS``), ``experiments.py`` (the
   protocols over seeds), ``course.py`` (what the notebooks share);
8. ``cli.py``, ``runner.py``, ``config.py``, ``checkpoint.py``, ``plots.py`` (the command line and its
   runs); ``distributed/`` (several processes); ``hf.py`` (EPI inside Hugging Face's ``Trainer``; needs the
   optional extra ``hf``, and is the only module that imports transformers).
"""
__version__ = "0.1.0"
