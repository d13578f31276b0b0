"""The DAG's steps, one module each, in execution order. Adding a step is one new module here plus its
name in ``STEPS``; ``pipelines/dag.py`` runs whatever this list names.

Every step module has the same shape (``preprocess.py`` is the shortest to read):

    Inputs     a dataclass whose fields name the upstream steps, typed by their ``Outputs``
    CACHE_KEY  the config sections (or dotted keys) the step's outputs depend on
    Outputs    a ``StepOutputs`` dataclass: what the step hands downstream, stored as outputs.json
    run(cfg, ctx, inputs, out) -> Outputs    does the work, writing files into the folder ``out``

and may define ``check(cfg)`` (config errors only it can see, raised on the driver before Ray starts) and
``cache_extra(cfg, ctx) -> dict`` (what its outputs depend on beyond the config, hashed into its key).

Importing this package imports no step (the CLI lists the names without loading torch or Ray). The driver
imports each step module to plan the DAG (``Inputs``, ``CACHE_KEY``, ``check``), reads cached ``Outputs`` and
runs no step itself, so a step module imports torch, Ray Train and Tune, and plotting inside the functions that
use them: a `vaegan run` then starts in half the time (tests/test_layers.py keeps it so).
"""
STEPS = ("preprocess", "tune", "train", "evaluate", "register")
