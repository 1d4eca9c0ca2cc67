"""Experiment configs: one module per task (``get_config(variant)``), ``common`` for the fields
every task shares, ``sweeps/`` for the paper's sweeps. Each module's docstring gives its launch
commands, what it reproduces and any stand-in data."""
