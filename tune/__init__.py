"""Sweeps: search spaces (``space.py``), the Tuner with its scheduler, search algorithm and trial function
(``sweep.py``), and the sweep report (``report.py``). The pipeline's tune step calls ``sweep.run``.

Layering: ``tune/`` imports ``vaegan/``, Ray Tune, and the pipeline's Ray Train entry point
(``pipelines.training``, since every trial is a real Train run); nothing that ``tune/`` imports imports
``tune/`` back, and only the tune step (``pipelines/steps/tune.py``) imports it.

The name clash with ``ray.tune``: this package is the top-level ``tune``, Ray's is ``ray.tune``, so the
two never collide as modules. Inside this package (and wherever both are needed) Ray's is always bound as
``from ray import tune as ray_tune``, and ``tune`` always means this package.
"""
