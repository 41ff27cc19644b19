"""One module per ``kdsearch`` subcommand (accelerate's ``commands/`` layout).

Each module has ``add_parser(subparsers)``, which adds its subparser (with its one-line help from
:data:`COMMAND_HELP`) and sets ``run`` as its default, and ``run(args) -> int`` (the exit code).
Building a parser imports only argparse, ``kdsearch.errors`` and ``kdsearch.constants``: torch,
Optuna, timm and plotly load inside ``run``, so ``kdsearch <command> --help`` answers at once, and
``kdsearch --help`` reads :data:`COMMAND_HELP` alone, importing no command module.
:mod:`kdsearch.cli` wires the modules and is the one place that prints errors and exits. Shared
pieces: ``arguments`` (typed numbers, the storage flags) and ``output`` (the stdout console).
"""

COMMAND_HELP: dict[str, str] = {
    "optimize": "run or resume a study",
    "studies": "list the bundled study files, or show one",
    "trials": "list a study's trials (or its Pareto front)",
    "export": "export a trial's student (safetensors, torchscript, onnx, onnx int8)",
    "report": "write a self-contained HTML report",
    "dashboard": "start optuna-dashboard on the study",
    "finetune": "fine-tune an exported student's head on local data, features frozen",
    "table": "a paper-style pivot table from storage (Markdown and CSV)",
    "cache": "list the teacher-logit caches (key, size, studies), or remove them",
    "repair": "cut a journal torn by a full disk or a crash at its torn record (keeps a backup)",
    "env": "versions, devices and NVML status for bug reports",
    "worker": "join an existing study from this host",
}
"""Every subcommand (the module ``kdsearch.commands.<name>``) and its one-line help, in the order
``kdsearch --help`` lists them."""
