"""engine/statistics.py: per-image counts vs the confusion matrix, components vs flood fill, bootstrap and Welch."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from data import IGNORE_INDEX
from engine import statistics as st
from engine.metric import ConfusionMatrix
from engine.statistics import (
    ImageCounts,
    PerImageCounts,
    compare_variants,
    frequency_thirds,
    image_counts,
    label_components,
    paired_bootstrap,
    size_counts,
    size_thresholds,
    t_quantile,
    welch_interval,
)


# ------------------------------------------------------------------------------------------- helpers
def random_maps(rng: np.random.Generator, n: int, num_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred, label) pairs of random sizes: blocky labels with ignored pixels, noisy predictions."""
    out = []
    for _ in range(n):
        h, w = rng.integers(1, 40, size=2)
        present = rng.choice(num_classes, size=rng.integers(1, 6), replace=False)
        label = present[rng.integers(0, present.size, size=(h // 4 + 1, w // 4 + 1))]
        label = np.kron(label, np.ones((4, 4), dtype=np.int64))[:h, :w]
        label[rng.random((h, w)) < 0.1] = IGNORE_INDEX
        pred = np.where(rng.random((h, w)) < 0.3, rng.integers(0, num_classes, size=(h, w)), label)
        pred[pred == IGNORE_INDEX] = 0
        out.append((pred, label))
    return out


def confusion_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """Reference: the project's ConfusionMatrix over all pairs."""
    cm = ConfusionMatrix(num_classes, "cpu")
    for pred, label in pairs:
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    return cm.metrics()


def bfs_components(label: np.ndarray, ignore: int = IGNORE_INDEX) -> tuple[np.ndarray, int]:
    """Reference flood fill, 4-connectivity, components numbered in raster order."""
    h, w = label.shape
    out = np.full((h, w), -1, dtype=np.int64)
    count = 0
    for y in range(h):
        for x in range(w):
            if label[y, x] == ignore or out[y, x] >= 0:
                continue
            out[y, x] = count
            queue = deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and out[ny, nx] < 0 and label[ny, nx] == label[cy, cx]:
                        out[ny, nx] = count
                        queue.append((ny, nx))
            count += 1
    return out, count


def synthetic_counts(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, C) intersection, union, gt satisfying 0 <= I <= gt <= U, with classes absent from some images."""
    gt = rng.integers(0, 3000, size=(n, c)) * (rng.random((n, c)) < 0.4)
    fp = rng.integers(0, 800, size=(n, c)) * (rng.random((n, c)) < 0.5)
    inter = (gt * rng.uniform(0.2, 0.9, size=(n, c))).astype(np.int64)
    return inter, gt + fp, gt


def names(n: int) -> list[str]:
    return [f"img{i:05d}" for i in range(n)]


# ------------------------------------------------------------------------------------------- per-image counts
def test_image_counts_hand_case() -> None:
    label = torch.tensor([[0, 0, 1, 1], [0, 2, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 3, 3]])
    counts = image_counts(pred, label, 5)
    # class 0: gt 3, pred 2, I 2 -> U 3; class 1: gt 2, pred 3, I 2 -> U 3; class 2: 1/1/1; 3 only on ignored pixels
    assert counts.classes.tolist() == [0, 1, 2]
    assert counts.intersection.tolist() == [2, 2, 1]
    assert counts.union.tolist() == [3, 3, 1]
    assert counts.gt.tolist() == [3, 2, 1]
    assert all(a.dtype == np.int64 for a in counts)


def test_image_counts_torch_and_numpy_paths_agree() -> None:
    pred, label = random_maps(np.random.default_rng(1), 1, 7)[0]
    a = st._counts_torch(torch.from_numpy(pred), torch.from_numpy(label), 7, IGNORE_INDEX)
    b = st._counts_numpy(pred, label, 7, IGNORE_INDEX)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", ["pred", "label"])
def test_image_counts_rejects_out_of_range(bad: str) -> None:
    pred, label = np.zeros((3, 3), np.int64), np.zeros((3, 3), np.int64)
    (pred if bad == "pred" else label)[1, 1] = 9
    with pytest.raises(ValueError, match="outside 0..4"):
        image_counts(pred, label, 5)
    with pytest.raises(ValueError, match="shape"):
        image_counts(pred, label[:2], 5)


def test_summed_counts_reproduce_confusion_matrix_exactly() -> None:
    rng = np.random.default_rng(0)
    pairs = random_maps(rng, 40, 12)  # classes 12 and 13 appear nowhere
    pairs[0][0][0, 0], pairs[0][1][0, 0] = 12, 0  # class 12 only predicted: union > 0, IoU 0, no accuracy
    counts = PerImageCounts(14)
    for i, (pred, label) in enumerate(pairs):
        counts.add(f"im{i}", torch.from_numpy(pred), torch.from_numpy(label))
    expected = confusion_metrics(pairs, 14)
    got = counts.metrics()
    assert got == expected  # exact, floats included (same integer totals, same float operations)
    assert got["iou"][13] is None and got["iou"][12] == 0.0 and got["acc"][12] is None
    # dense() rows sum to the totals
    inter, _, gt = counts.dense()
    assert inter.shape == (40, 14) and inter.dtype == np.int64
    assert np.array_equal(inter.sum(0), counts.totals()[0]) and np.array_equal(gt.sum(0), counts.totals()[2])


def test_save_load_concatenate_sorted(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pairs = random_maps(rng, 10, 6)
    counts = PerImageCounts(6)
    for i, (pred, label) in enumerate(pairs):
        counts.add(f"im{9 - i}", pred, label)
    path = tmp_path / "counts"  # no suffix: written as given
    counts.save(path)
    loaded = PerImageCounts.load(path)
    assert loaded.names == counts.names and loaded.has_sizes
    assert all(np.array_equal(x, y) for x, y in zip(loaded.dense(), counts.dense()))
    assert np.array_equal(loaded.sizes(), counts.sizes()) and loaded.metrics() == counts.metrics()
    # two "ranks" joined and sorted give the same as the whole, sorted
    joined = PerImageCounts.concatenate([counts.subset(range(0, 10, 2)), counts.subset(range(1, 10, 2))]).sorted()
    assert joined.names == sorted(counts.names)
    assert all(np.array_equal(x, y) for x, y in zip(joined.dense(), counts.sorted().dense()))
    with pytest.raises(ValueError, match="already"):
        counts.append("im0", ImageCounts(*(np.zeros(0, np.int64),) * 4), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="every image or for none"):
        counts.append("new", ImageCounts(*(np.zeros(0, np.int64),) * 4))


def test_file_size_for_ade20k_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n, c = 2000, 150
    inter, union, gt = synthetic_counts(rng, n, c)
    keep = rng.random((n, c)) < 20 / c  # ~20 classes per image
    counts = PerImageCounts.from_dense(names(n), inter * keep, union * keep, gt * keep,
                                       sizes=rng.integers(0, 1000, size=(n, 3, 3)))
    counts.save(tmp_path / "c.npz")
    assert (tmp_path / "c.npz").stat().st_size < 3_000_000


# ------------------------------------------------------------------------------------------- object sizes
def test_components_match_flood_fill() -> None:
    rng = np.random.default_rng(4)
    shapes = [(1, 1), (1, 9), (9, 1), (2, 2)] + [tuple(rng.integers(2, 24, size=2)) for _ in range(60)]
    for i, (h, w) in enumerate(shapes):
        label = rng.integers(0, 2 + i % 4, size=(h, w))
        label[rng.random((h, w)) < 0.15] = IGNORE_INDEX
        got, count = label_components(label)
        ref, ref_count = bfs_components(label)
        assert count == ref_count and np.array_equal(got, ref), (h, w)


def test_components_spiral_and_u_shapes() -> None:
    # Shapes whose runs join late (a U joined only at its bottom, a spiral): union-find must merge all.
    label = np.zeros((9, 9), np.int64)
    label[1:8, 1] = label[7, 1:8] = label[1:8, 7] = 1  # U
    label[1:6, 3] = label[1:6, 5] = label[5, 3:6] = 2  # nested U
    got, count = label_components(label)
    ref, ref_count = bfs_components(label)
    assert count == ref_count and np.array_equal(got, ref)
    assert len(np.unique(got[label == 1])) == 1 and len(np.unique(got[label == 2])) == 1


def bucket_reference(pred: np.ndarray, label: np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    comps, count = bfs_components(label)
    out = np.zeros((3, 3), np.int64)
    for k in range(count):
        mask = comps == k
        area = int(mask.sum())
        b = 0 if area < thresholds[0] else 1 if area < thresholds[1] else 2
        out[b] += [int((pred[mask] == label[mask]).sum()), area, 1]
    return out


def test_size_counts_match_flood_fill_reference() -> None:
    rng = np.random.default_rng(5)
    for _ in range(30):
        h, w = rng.integers(4, 30, size=2)
        label = np.kron(rng.integers(0, 4, size=(h // 3 + 1, w // 3 + 1)), np.ones((3, 3), np.int64))[:h, :w]
        label[rng.random((h, w)) < 0.05] = IGNORE_INDEX
        pred = np.where(rng.random((h, w)) < 0.25, 0, label)
        thresholds = (6.0, 20.0)
        got = size_counts(torch.from_numpy(pred), torch.from_numpy(label), thresholds=thresholds)
        assert np.array_equal(got, bucket_reference(pred, label, thresholds))
    # default thresholds scale COCO's with the image area
    assert size_thresholds(480, 640) == (1024.0, 9216.0)
    assert size_thresholds(960, 1280) == (4096.0, 36864.0)
    pred, label = np.zeros((24, 32), np.int64), np.zeros((24, 32), np.int64)
    label[:2, :2] = 1  # bounds 1024 * 768 / 307200 = 2.56 and 23.04: 4 px is medium, the rest (764 px) large
    assert np.array_equal(size_counts(pred, label)[:, 1], [0, 4, 24 * 32 - 4])


# ------------------------------------------------------------------------------------------- bootstrap
def test_identical_runs_give_exactly_zero() -> None:
    rng = np.random.default_rng(6)
    inter, union, gt = synthetic_counts(rng, 200, 30)
    run = PerImageCounts.from_dense(names(200), inter, union, gt)
    result = compare_variants(run, run, resamples=300, seed=1)
    test = result["test_sampling"]
    assert test["diff"] == test["low"] == test["high"] == 0.0 and not test["excludes_zero"]
    assert all(result["thirds"][t]["low"] == result["thirds"][t]["high"] == 0.0 for t in st.THIRDS)
    assert all(c["diff"] in (0.0, None) and c["low"] in (0.0, None) for c in result["per_class"])
    assert "includes 0" in result["verdict"] and "training randomness: not estimated" in result["verdict"]


def better_on_half(rng: np.random.Generator, inter: np.ndarray, union: np.ndarray, gt: np.ndarray) -> tuple:
    """Variant b: on a random half of the images, every class gains a quarter of its missed pixels (I up, U same)."""
    half = rng.permutation(inter.shape[0])[: inter.shape[0] // 2]
    inter_b = inter.copy()
    inter_b[half] += (gt[half] - inter[half]) // 4
    return inter_b, union, gt


def test_interval_covers_the_known_difference() -> None:
    rng = np.random.default_rng(7)
    n, c = 300, 25
    inter, union, gt = synthetic_counts(rng, n, c)
    inter_b, _, _ = better_on_half(rng, inter, union, gt)
    a = PerImageCounts.from_dense(names(n), inter, union, gt)
    b = PerImageCounts.from_dense(names(n), inter_b, union, gt)
    result = compare_variants(a, b, labels=("ref", "better"), resamples=1000, seed=0)
    true_diff = b.metrics()["mIoU"] - a.metrics()["mIoU"]
    test = result["test_sampling"]
    assert test["diff"] == pytest.approx(true_diff, abs=1e-9) and true_diff > 0
    assert test["low"] <= true_diff <= test["high"] and test["excludes_zero"]
    assert test["a"] == pytest.approx(a.metrics()["mIoU"], abs=1e-9)
    assert result["verdict"].startswith("better - ref: mIoU") and "test-set sampling: 95% CI [" in result["verdict"]


def test_coverage_against_a_population() -> None:
    # The "true" difference is the population's; each test set is a sample of it. A 95 % interval should cover it
    # in most of 40 draws (deterministic: seeded).
    rng = np.random.default_rng(8)
    inter, union, gt = synthetic_counts(rng, 6000, 15)
    inter_b, _, _ = better_on_half(rng, inter, union, gt)
    population = [PerImageCounts.from_dense(names(6000), x, union, gt) for x in (inter, inter_b)]
    true_diff = population[1].metrics()["mIoU"] - population[0].metrics()["mIoU"]
    a, b = population[0].dense(), population[1].dense()
    covered = 0
    for draw in range(40):
        idx = rng.choice(6000, size=150, replace=False)
        r = paired_bootstrap(a[0][idx], a[1][idx], b[0][idx], b[1][idx], resamples=400, seed=draw)
        covered += r["groups"]["mean"]["low"] <= true_diff <= r["groups"]["mean"]["high"]
    assert covered >= 34


def test_seeded_results_are_reproducible() -> None:
    rng = np.random.default_rng(9)
    inter, union, gt = synthetic_counts(rng, 120, 10)
    inter_b, _, _ = better_on_half(rng, inter, union, gt)
    r1 = paired_bootstrap(inter, union, inter_b, union, resamples=250, seed=3)
    r2 = paired_bootstrap(inter, union, inter_b, union, resamples=250, seed=3)
    r3 = paired_bootstrap(inter, union, inter_b, union, resamples=250, seed=4)
    assert r1 == r2 and r1 != r3
    # the first resamples of a longer run are the same draws (blocks of a fixed size)
    pairs = [paired_bootstrap(inter, union, inter_b, union, resamples=r, seed=3) for r in (100, 200)]
    prefix = st._weights(np.random.default_rng(3), 120, 100)
    assert np.array_equal(prefix.sum(1), np.full(100, 120.0))  # each resample draws N images
    assert pairs[0]["groups"]["mean"]["diff"] == pairs[1]["groups"]["mean"]["diff"]


def test_names_must_match_in_order() -> None:
    rng = np.random.default_rng(10)
    inter, union, gt = synthetic_counts(rng, 6, 4)
    a = PerImageCounts.from_dense(names(6), inter, union, gt)
    shuffled = a.subset([1, 0, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="another order; call .sorted"):
        compare_variants(a, shuffled)
    assert compare_variants(a.sorted(), shuffled.sorted(), resamples=10)["test_sampling"]["diff"] == 0.0
    with pytest.raises(ValueError, match="not evaluated on the same images"):
        compare_variants(a, a.subset(range(5)))
    gt2 = gt.copy()
    gt2[0, 0] += 1
    with pytest.raises(ValueError, match="different ground-truth"):
        compare_variants(a, PerImageCounts.from_dense(names(6), inter, union + 1, gt2))
    with pytest.raises(ValueError, match="shapes differ"):
        paired_bootstrap(inter, union, inter[:5], union[:5])


def test_frequency_thirds() -> None:
    thirds = frequency_thirds(np.array([5, 0, 9, 9, 1, 7, 3, 2]))
    assert {k: v.tolist() for k, v in thirds.items()} == {"frequent": [2, 3, 5], "medium": [0, 6], "rare": [7, 4]}


def test_per_class_and_size_bucket_intervals() -> None:
    rng = np.random.default_rng(11)
    n, c = 200, 6
    inter, union, gt = synthetic_counts(rng, n, c)
    inter_b = inter.copy()
    inter_b[:, 0] = gt[:, 0]  # class 0 becomes perfect in b; others unchanged
    sizes_a = np.zeros((n, 3, 3), np.int64)
    sizes_a[:, :, 1] = rng.integers(100, 1000, size=(n, 3))
    sizes_a[:, :, 0] = sizes_a[:, :, 1] // 2
    sizes_a[:, :, 2] = 1
    sizes_b = sizes_a.copy()
    sizes_b[:, 0, 0] = sizes_b[:, 0, 1]  # small objects perfect in b
    a = PerImageCounts.from_dense(names(n), inter, union, gt, sizes_a)
    b = PerImageCounts.from_dense(names(n), inter_b, union, gt, sizes_b)
    r = compare_variants(a, b, labels=("a", "b"), class_names=[f"c{i}" for i in range(c)], resamples=300)
    pc = r["per_class"]
    assert pc[0]["name"] == "c0" and pc[0]["low"] > 0
    assert all(p["diff"] == p["low"] == p["high"] == 0.0 for p in pc[1:])
    assert r["sizes"]["small"]["low"] > 0 and r["sizes"]["small"]["b"] == 100.0
    assert r["sizes"]["large"]["diff"] == 0.0 and r["sizes"]["medium"]["components"] == n


# ------------------------------------------------------------------------------------------- several seeds
def test_t_quantile_known_values() -> None:
    assert t_quantile(0.975, 1) == pytest.approx(12.706204736, rel=1e-8)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652730, rel=1e-8)
    assert t_quantile(0.975, 5) == pytest.approx(2.570581836, rel=1e-8)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272456, rel=1e-8)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963985, rel=1e-8)
    assert t_quantile(0.025, 3.5) == pytest.approx(-t_quantile(0.975, 3.5))
    p = 0.9  # closed forms for df = 1 and 2
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_welch_interval_by_hand() -> None:
    a, b = [40.0, 41.0, 42.0], [42.0, 44.0]
    r = welch_interval(a, b)
    va, vb = 1.0 / 3, 2.0 / 2  # sample variances 1 and 2 over n
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    assert r["diff"] == pytest.approx(2.0) and r["df"] == pytest.approx(df)
    assert r["low"] == pytest.approx(2 - half) and r["high"] == pytest.approx(2 + half)
    assert welch_interval([40.0], b) is None and welch_interval(a, [1.0]) is None
    same = welch_interval([1.0, 1.0], [2.0, 2.0])
    assert same["low"] == same["high"] == 1.0 and same["excludes_zero"]


def test_compare_several_seeds() -> None:
    rng = np.random.default_rng(12)
    n, c = 150, 12
    inter, union, gt = synthetic_counts(rng, n, c)
    runs_a, runs_b = [], []
    for s in range(3):  # seeds: small random changes of the intersection; b better on half the images
        jitter = lambda x: np.minimum(gt, np.maximum(0, x + rng.integers(-20, 21, size=x.shape)))
        runs_a.append(PerImageCounts.from_dense(names(n), jitter(inter), union, gt))
        runs_b.append(PerImageCounts.from_dense(names(n), jitter(better_on_half(rng, inter, union, gt)[0]), union, gt))
    r = compare_variants(runs_a, runs_b, labels=("norm-conv", "def-conv-v2"), resamples=400, seed=0)
    mean_diff = np.mean(r["miou"]["b"]) - np.mean(r["miou"]["a"])
    assert r["test_sampling"]["diff"] == pytest.approx(mean_diff, abs=1e-9)
    assert r["training_randomness"]["diff"] == pytest.approx(mean_diff, abs=1e-9)
    assert r["training_randomness"]["question"] == "training randomness" and r["two_level"] is not None
    v = r["verdict"]
    assert v.count("\n") == 0 and "test-set sampling" in v and "training randomness: 95% CI" in v and "two-level" in v
    one = compare_variants(runs_a[:1], runs_b, resamples=50)
    assert one["training_randomness"] is None and one["two_level"] is None
