"""Fixtures for the data tests: a private decode cache and tiny image-folder trees on disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from data_helpers import CLASS_COLOURS, MakeTree, write_png


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own decode cache, so nothing is written to ~/.cache or shared."""
    cache = tmp_path / "kd-cache"
    monkeypatch.setenv("KDSEARCH_DATA_CACHE", str(cache))
    return cache


@pytest.fixture
def make_tree(tmp_path: Path) -> MakeTree:
    """Build ``root/<split>/<class>/<i>.png``; returns the root.

    ``splits`` maps a split folder name to images per class; ``classes`` can differ per split
    through ``test_classes``; ``sizes`` cycles through (width, height) pairs in px.
    """

    def make(
        name: str = "tree",
        splits: dict[str, int] | None = None,
        classes: Sequence[str] = tuple(CLASS_COLOURS),
        test_classes: Sequence[str] | None = None,
        sizes: Sequence[tuple[int, int]] = ((12, 12),),
    ) -> Path:
        root = tmp_path / name
        splits = splits or {"train": 8, "test": 3}
        seed = 0
        for split, per_class in splits.items():
            names = classes if split == "train" or test_classes is None else test_classes
            for c in names:
                for i in range(per_class):
                    write_png(
                        root / split / c / f"{i:04d}.png",
                        CLASS_COLOURS.get(c, (90, 90, 90)),
                        sizes[seed % len(sizes)],
                        seed,
                    )
                    seed += 1
        return root

    return make
