"""One module per ``kdsearch`` subcommand (accelerate's ``commands/`` layout).

Each module has ``add_parser(subparsers)``, which adds its subparser and sets ``run`` as its
default, and ``run(args) -> int`` (the exit code). Building the parsers imports only argparse,
``kdsearch.errors`` and ``kdsearch.config``: torch, Optuna, timm and plotly load inside ``run``,
so ``kdsearch --help`` and ``kdsearch <command> --help`` answer at once. :mod:`kdsearch.cli` wires
the modules and is the one place that prints errors and exits. Shared pieces: ``arguments``
(typed numbers, the storage flags) and ``output`` (the stdout console).
"""
