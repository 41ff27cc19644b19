"""Fine-tuning after distillation, on a user's data: train an exported student's head, features frozen.

Modules, by concept: ``pool`` (the user's data as one pool of images) and ``exported``
(:func:`finetune_checkpoint`: holdout, training, new export folder + card). The training loop
itself is :mod:`kdsearch.distill.head`, shared with the search's per-trial ``finetune:`` stage;
the folder staging and card writing are :mod:`kdsearch.modelcard`, shared with ``kdsearch export``.
"""

from __future__ import annotations

from kdsearch.finetune.exported import FinetuneResult, finetune_checkpoint
from kdsearch.finetune.pool import FinetunePool, indices_sha256, load_finetune_pool, parse_data_spec

__all__ = [
    "FinetuneResult",
    "FinetunePool",
    "finetune_checkpoint",
    "indices_sha256",
    "load_finetune_pool",
    "parse_data_spec",
]
