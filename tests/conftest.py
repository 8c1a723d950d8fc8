"""Shared fixtures: a tiny ADEChallengeData2016-layout tree generated in tmp_path."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU, the Triton kernels (models/triton_*.py) run in Triton's CPU interpreter, so the tests check
# their numerics on any machine. This must be set before those modules are imported (triton.jit reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """Tests that run a command line in-process (scripts/data_speed.py sets one thread, as a loader worker) must not
    change the thread count of later tests: the in-process runs that resume tests compare with would differ."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny forward passes: on a busy 2-core machine, thread hand-offs made them
    20x slower (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_ade_tree(root: Path, num_train: int = 4, num_val: int = 2, size: tuple[int, int] = (40, 30)) -> Path:
    """Write a small ADE20K-format tree at ``root``; return it.

    Annotations hold 10x10 blocks of ADE ids (0 = other, 1..150); images are noisy colours of their blocks.
    """
    width, height = size
    for split_id, (split, prefix, count) in enumerate(
        (("training", "ADE_train", num_train), ("validation", "ADE_val", num_val))
    ):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([split_id, i])
            blocks = rng.choice([0, 1, 3, 5, 13, 21, 150], size=(-(-height // 10), -(-width // 10)))
            label = np.kron(blocks, np.ones((10, 10), np.int64))[:height, :width].astype(np.uint8)
            colours = rng.integers(0, 256, (256, 3))
            image = np.clip(colours[label] + rng.normal(0, 5, (height, width, 3)), 0, 255).astype(np.uint8)
            name = f"{prefix}_{i + 1:08d}"
            Image.fromarray(image, "RGB").save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label, "L").save(root / "annotations" / split / f"{name}.png")
    return root


def tiny_run(tree: Path, *more: str) -> list[str]:
    """train.py's arguments for a def-conv-v2 run (demo.yaml) on 32x32 crops of the tiny ADE tree ``tree``: seconds
    on the CPU (--device=cpu deliberately: ADE20K data asks for a GPU). ``more`` (key=value) win over these."""
    return ["--device=cpu", f"data.root={tree}", "data.dataset=ade20k", "data.num_workers=0", "data.scale=[48,48]",
            "data.crop_size=32", "train.log_interval=1", "train.tb_images=0", *more]


@pytest.fixture(scope="module")
def tree(module_dir: Path) -> Path:
    """A tiny ADE tree shared by a module's training runs (``tiny_run``): 6 training and 2 validation images."""
    return write_ade_tree(module_dir / "ade" / "ADEChallengeData2016", num_train=6, num_val=2, size=(48, 40))


@pytest.fixture
def make_ade_tree(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small ADE20K-format tree (``write_ade_tree``); the root defaults to tmp_path."""

    def make(root: Path | None = None, num_train: int = 4, num_val: int = 2, size: tuple[int, int] = (40, 30)) -> Path:
        root = Path(root) if root is not None else tmp_path / "ADEChallengeData2016"
        return write_ade_tree(root, num_train, num_val, size)

    return make


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder for the files one test module shares (trained runs, checkpoints), removed after the module.

    Each ResNet-50 checkpoint is about 280 MB and the suite writes some forty: with ``tmp_path_retention_policy =
    "failed"`` (pyproject.toml) a passing test's tmp_path goes at once, and this folder goes when its module is done,
    so the suite needs about 2 GB of free disk instead of 10. Kept when a test of the module failed, to look into.
    """
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
