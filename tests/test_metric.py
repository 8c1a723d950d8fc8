"""ConfusionMatrix: hand-computed cases, a brute-force reference, accumulation and the cross-process sum."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data import IGNORE_INDEX
from engine.metric import ConfusionMatrix


def metrics_of(pred: list[int], target: list[int], n: int) -> dict:
    cm = ConfusionMatrix(n, "cpu")
    cm.update(torch.tensor(pred), torch.tensor(target))
    return cm.metrics()


def test_hand_computed_case() -> None:
    # 4 classes. Class 3 is in neither gt nor pred; class 2 is only predicted; the last two pixels are
    # ignored although their prediction is class 1 (which would otherwise change class 1's IoU).
    target = [0, 0, 0, 1, 1, 1, 0, IGNORE_INDEX, IGNORE_INDEX]
    pred = [0, 0, 1, 1, 1, 2, 0, 1, 1]
    m = metrics_of(pred, target, 4)
    # class 0: gt 4, pred 3, inter 3 -> union 4 -> IoU 75; acc 3/4
    # class 1: gt 3, pred 3, inter 2 -> union 4 -> IoU 50; acc 2/3
    # class 2: gt 0, pred 1, inter 0 -> union 1 -> IoU 0 (counts in mIoU), acc None (not in mAcc)
    # class 3: absent everywhere -> None, left out of mIoU (not counted as 0)
    assert m["iou"][:3] == pytest.approx([75.0, 50.0, 0.0]) and m["iou"][3] is None
    assert m["acc"][:2] == pytest.approx([75.0, 200 / 3]) and m["acc"][2] is None and m["acc"][3] is None
    assert m["mIoU"] == pytest.approx((75 + 50 + 0) / 3)
    assert m["mAcc"] == pytest.approx((75 + 200 / 3) / 2)
    assert m["aAcc"] == pytest.approx(100 * 5 / 7)
    assert m["score"] == pytest.approx((100 * 5 / 7 + 125 / 3) / 2)


def test_ignore_pixels_never_count() -> None:
    base = metrics_of([0, 1], [0, 1], 3)
    with_ignored = metrics_of([0, 1, 2, 2, 0], [0, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], 3)
    assert with_ignored == base
    assert base["mIoU"] == 100.0 and base["iou"][2] is None


def test_empty_matrix_is_nan() -> None:
    m = metrics_of([1, 2], [IGNORE_INDEX, IGNORE_INDEX], 3)
    assert math.isnan(m["mIoU"]) and math.isnan(m["aAcc"]) and m["iou"] == [None] * 3


def test_out_of_range_label_raises() -> None:
    cm = ConfusionMatrix(3, "cpu")
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 0]), torch.tensor([0, 7]))


def brute_force(pred: np.ndarray, target: np.ndarray, n: int) -> dict:
    """Explicit per-class intersection and union, in percent (the definitions, written out)."""
    labelled = target != IGNORE_INDEX
    ious, accs = [], []
    for c in range(n):
        inter = np.sum((pred == c) & (target == c) & labelled)
        union = np.sum(((pred == c) | (target == c)) & labelled)
        gt = np.sum((target == c) & labelled)
        ious.append(100.0 * inter / union if union > 0 else None)
        accs.append(100.0 * inter / gt if gt > 0 else None)
    a_acc = 100.0 * np.sum((pred == target) & labelled) / np.sum(labelled)
    m_iou = np.mean([v for v in ious if v is not None])
    m_acc = np.mean([v for v in accs if v is not None])
    return {"iou": ious, "acc": accs, "mIoU": m_iou, "mAcc": m_acc, "aAcc": a_acc, "score": (a_acc + m_iou) / 2}


def random_maps(seed: int, n: int, shape: tuple[int, ...] = (3, 37, 41)) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    # Use only some classes so that absent and prediction-only classes occur.
    used = rng.choice(n, size=max(2, n // 2), replace=False)
    target = rng.choice(used, size=shape)
    target[rng.random(shape) < 0.2] = IGNORE_INDEX
    pred = np.where(rng.random(shape) < 0.5, target, rng.choice(used, size=shape))
    pred[pred == IGNORE_INDEX] = rng.choice(used)
    pred[rng.random(shape) < 0.05] = rng.integers(n)  # a few predictions of unused classes
    return torch.from_numpy(pred), torch.from_numpy(target)


@pytest.mark.parametrize("n", [7, 150])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_brute_force(n: int, seed: int) -> None:
    pred, target = random_maps(seed, n)
    cm = ConfusionMatrix(n, "cpu")
    cm.update(pred, target)
    got, want = cm.metrics(), brute_force(pred.numpy(), target.numpy(), n)
    for key in ("mIoU", "mAcc", "aAcc", "score"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    for key in ("iou", "acc"):
        assert [v is None for v in got[key]] == [v is None for v in want[key]]
        assert [v for v in got[key] if v is not None] == pytest.approx([v for v in want[key] if v is not None])
    assert None in got["iou"]  # the case of absent classes is exercised


def test_accumulation_equals_one_update() -> None:
    pred, target = random_maps(3, 7, shape=(4, 20, 30))
    parts = ConfusionMatrix(7, "cpu")
    for i in range(4):
        parts.update(pred[i], target[i])
    whole = ConfusionMatrix(7, "cpu")
    whole.update(pred.flatten(), target.flatten())
    assert parts.mat.dtype == torch.int64
    assert torch.equal(parts.mat, whole.mat)


def _all_reduce_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pred, target = random_maps(5, 7, shape=(4, 20, 30))
        cm = ConfusionMatrix(7, "cpu")
        cm.update(pred[rank * 2 : rank * 2 + 2], target[rank * 2 : rank * 2 + 2])
        cm.num_images = 2
        cm.all_reduce()
        torch.save({"mat": cm.mat, "num_images": cm.num_images}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes(tmp_path: Path) -> None:
    # Fork where it is safe (it skips re-importing torch and torchvision: 0.1 s instead of ~9 s on 2 cores);
    # spawn otherwise, e.g. when an earlier test has initialised CUDA in this process.
    fork_ok = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    mp.start_processes(
        _all_reduce_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork" if fork_ok else "spawn",
    )
    pred, target = random_maps(5, 7, shape=(4, 20, 30))
    single = ConfusionMatrix(7, "cpu")
    single.update(pred, target)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["mat"], single.mat)
        assert got["num_images"] == 4


def test_all_reduce_without_process_group_is_noop() -> None:
    cm = ConfusionMatrix(3, "cpu")
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before)
