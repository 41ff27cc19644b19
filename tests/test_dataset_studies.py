"""Issue 22, the paper's other data sets bundled: ``imagenet-deit`` (ILSVRC image-folder layout,
a pretrained DeiT teacher used as is, top-k logits, streamed training images) and
``cifar100-deit`` (the python pickles). Each is validated, and run end to end, on tiny generated
data in its own format, overriding with ``--set`` only what a CPU test must change: the data's
place and size, a tiny local teacher instead of the hub download, tiny boxes, the GPU-only figures."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from optuna.trial import TrialState

from kdsearch.config import load_config
from kdsearch.search.preflight import preflight
from kdsearch.storage import SHARED_CACHE_DIR, default_storage_url, list_caches, load_study

from cli_helpers import run_cli

IMAGENET_CLASSES = 25  # more than the study's top-20 logits
CIFAR100_CLASSES = 100
TINY_TEACHER = "{img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}"


def _write_imagenet_tree(root: Path, train_per_class: int = 6, val_per_class: int = 2) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: ILSVRC's layout, odd sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(IMAGENET_CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = (48 + 8 * (i % 3), 40 + 8 * (c % 2))  # not square, as ImageNet photos are not
                arr = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
                arr[..., c % 3] += np.uint8(60 + 7 * c)  # a learnable class colour
                Image.fromarray(arr).save(folder / f"n{c:08d}_{i}.JPEG", format="JPEG", quality=90)
    return root


def _write_cifar100_pickles(root: Path, train_per_class: int = 3, test_per_class: int = 1) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: the python-pickle release, as torchvision unpacks it."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def batch(per_class: int) -> dict[bytes, object]:
        labels = [c for c in range(CIFAR100_CLASSES) for _ in range(per_class)]
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        return {b"data": data, b"fine_labels": labels, b"coarse_labels": [c // 5 for c in labels]}

    for name, entry in (("train", batch(train_per_class)), ("test", batch(test_per_class)),
                        ("meta", {b"fine_label_names": [f"class{c}".encode() for c in range(CIFAR100_CLASSES)],
                                  b"coarse_label_names": [f"super{c}".encode() for c in range(20)]})):
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)  # bytes keys, as the released files have
    return root


def _cpu_sets(run_dir: Path) -> list[str]:
    """What a CPU test must change in either study: boxes, the GPU-only objective and constraint,
    cheap measurements, small students."""
    return [
        f"study.run_dir={run_dir}", "study.trial_time=2s", "study.grace=2m", "study.budget=5m",
        "measure.latency={batch_sizes: [1], devices: [auto], min_repeats: 3, max_repeats: 5, max_time: 0.2s}",
        "measure.eval_batch_size=64", "distill.batch_size=32", "distill.eval_subset=null",
        "student.vgg.width=0.0625",
        "teacher.name=vit_tiny_patch16_224", "teacher.pretrained=false", f"teacher.model_kwargs={TINY_TEACHER}",
        "teacher.input_size=32",
    ]


def _cpu_study_file(name: str, tmp_path: Path) -> Path:
    """The bundled study less its GPU-only objectives and constraints (energy, CUDA memory), which
    ``--set`` cannot remove and a CPU refuses before the study starts; everything else as shipped."""
    from kdsearch.config.loader import bundled_study
    from kdsearch.metrics import metric_info

    raw = yaml.safe_load(bundled_study(name).read_text(encoding="utf-8"))

    def cpu_ok(metric: str) -> bool:
        info = metric_info(metric)
        return info is not None and not info.needs_cuda and "energy" not in metric

    raw["objectives"] = {m: d for m, d in raw["objectives"].items() if cpu_ok(m)}
    raw["constraints"] = {m: v for m, v in (raw.get("constraints") or {}).items() if cpu_ok(m)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _imagenet_sets(root: Path, run_dir: Path) -> list[str]:
    return [*_cpu_sets(run_dir), f"data.root={root}", "data.image_size=64", "data.val_fraction=0.2",
            "data.max_test_samples=null", "data.num_workers=0", "student.resolution=[64]", "student.vgg.depth=[8]",
            "teacher.expected_accuracy=null"]  # a random tiny teacher stands in for DeiT-S: no fit, as in the study


def _cifar100_sets(root: Path, run_dir: Path) -> list[str]:
    return [*_cpu_sets(run_dir), f"data.root={root}", "data.download=false", "data.val_fraction=0.34",
            "student.resolution=[32]", "student.vgg.depth=[2]", "teacher.fit.time=2s", "teacher.cache.views=2"]


def _args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_the_bundled_studies_say_what_the_paper_ran() -> None:
    imagenet, cifar100 = load_config("imagenet-deit"), load_config("cifar100-deit")
    assert (imagenet.study.name, cifar100.study.name) == ("imagenet-deit", "cifar100-deit")
    # ImageNet-1k: the image-folder layout streamed from disk, a pretrained DeiT used as is, top-k logits.
    assert imagenet.data.dataset == "imagenet" and imagenet.data.device_resident == "false"
    t = imagenet.teacher
    assert t.name.startswith("deit_") and t.pretrained and t.fit.enabled == "false" and t.cache.topk == 20
    assert imagenet.data.image_size == 224 and set(imagenet.student.resolution.values()) <= {64, 96, 128, 160, 224}
    # CIFAR-100: the python pickles (downloaded when online), DeiT fitted to its 100 classes.
    assert cifar100.data.dataset == "cifar100" and cifar100.data.download
    assert cifar100.teacher.name.startswith("deit_") and cifar100.teacher.fit.enabled == "auto"


@pytest.mark.parametrize("name", ["imagenet-deit", "cifar100-deit"])
def test_each_study_validates_on_tiny_data_in_its_format(name: str, tmp_path: Path) -> None:
    """The preflight a real run starts with (data found and split, cache size, teacher built),
    on generated data in the study's own format."""
    if name == "imagenet-deit":
        sets = _imagenet_sets(_write_imagenet_tree(tmp_path / "imagenet"), tmp_path / "runs")
        classes = IMAGENET_CLASSES
    else:
        sets = _cifar100_sets(_write_cifar100_pickles(tmp_path / "cifar"), tmp_path / "runs")
        classes = CIFAR100_CLASSES
    cfg = load_config(_cpu_study_file(name, tmp_path), sets)
    assert cfg.study.name == name and cfg.objectives == {"val_accuracy": "maximize", "latency_ms_b1": "minimize"}
    assert preflight(cfg) == classes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet-deit", "cifar100-deit"])
def test_each_study_runs_end_to_end_on_tiny_data(name: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    if name == "imagenet-deit":
        sets = _imagenet_sets(_write_imagenet_tree(tmp_path / "imagenet"), run_dir)
    else:
        sets = _cifar100_sets(_write_cifar100_pickles(tmp_path / "cifar"), run_dir)
    study_file = _cpu_study_file(name, tmp_path)
    assert run_cli("optimize", "--config", study_file, "--n-trials", "1", "--plain", *_args(sets)) == 0
    study = load_study(default_storage_url(run_dir, name), name)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and 0.0 <= trial.user_attrs["val_accuracy"] <= 1.0
    (teacher,) = study.user_attrs["teachers"].values()
    assert teacher["mode"] == "cached" and teacher["cache"]["built"]
    cache = teacher["cache"]
    if name == "imagenet-deit":
        assert teacher["fit"] == {}  # used as is, no fit
        assert study.user_attrs["config"]["data"]["device_resident"] == "false"
        (entry,) = list_caches(run_dir / SHARED_CACHE_DIR / "logits")
        assert entry.key == cache["key"] and entry.manifest["topk"] == 20 and entry.manifest["views"] == 8
    else:
        assert teacher["fit"]["fit_time_s"] > 0  # DeiT's head is fitted to the 100 classes
