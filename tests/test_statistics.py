"""engine/statistics.py: per-image counts against the confusion matrix, regions against a flood fill, and the
coverage of every interval compare.py prints on data drawn from a known model."""

from __future__ import annotations

import warnings
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from configs import UserError
from data import IGNORE_INDEX
from engine import statistics as st
from engine.metric import ConfusionMatrix, metrics_from_counts
from engine.statistics import PerImageCounts, compare_sides, count_image, label_regions, size_counts


# ------------------------------------------------------------------------------------------- per-image counts
def random_maps(rng: np.random.Generator, n: int, num_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pred, label) pairs of random sizes: blocky labels with ignored pixels, noisy predictions."""
    out = []
    for _ in range(n):
        h, w = rng.integers(1, 40, size=2)
        present = rng.choice(num_classes, size=rng.integers(1, min(6, num_classes + 1)), replace=False)
        blocks = present[rng.integers(0, present.size, size=(h // 4 + 1, w // 4 + 1))]
        label = np.kron(blocks, np.ones((4, 4), np.int64))[:h, :w]
        label[rng.random((h, w)) < 0.1] = IGNORE_INDEX
        pred = np.where(rng.random((h, w)) < 0.3, rng.integers(0, num_classes, size=(h, w)), label)
        pred[pred == IGNORE_INDEX] = 0
        out.append((torch.from_numpy(pred), torch.from_numpy(label)))
    return out


def counts_of(pairs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> PerImageCounts:
    rows = [(f"im{i:03d}", *count_image(p, t, num_classes)) for i, (p, t) in enumerate(pairs)]
    return PerImageCounts.from_rows(rows, num_classes, "x")


def test_image_counts_hand_case() -> None:
    label = torch.tensor([[0, 0, 1, 1], [0, 2, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 3, 3]])
    # class 0: gt 3, pred 2, I 2 -> U 3; class 1: gt 2, pred 3, I 2 -> U 3; class 2: 1/1/1; 3 only on ignored pixels
    assert count_image(pred, label, 5)[0].tolist() == [[2, 3, 3], [2, 3, 2], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="outside 0..4"):
        count_image(pred, torch.full_like(label, 9), 5)


def test_summed_counts_give_the_confusion_matrix_metrics_exactly(tmp_path: Path) -> None:
    pairs = random_maps(np.random.default_rng(0), 40, 12)  # counted as 14 classes: 12 and 13 appear nowhere
    pairs[0][0][0, 0], pairs[0][1][0, 0] = 12, 0  # class 12 only predicted: union > 0, IoU 0, no accuracy
    matrix = ConfusionMatrix(14)
    for pred, label in pairs:
        matrix.update(pred, label)
    counts = counts_of(pairs, 14)
    metrics = metrics_from_counts(*counts.counts.sum(0).T)
    assert metrics == matrix.metrics()  # exact, floats included: one rule (engine.metric.metrics_from_counts)
    assert metrics["iou"][12] == 0.0 and metrics["acc"][12] is None and metrics["iou"][13] is None
    # saved and loaded, gathered from two "processes" and sorted: the same arrays
    counts.save(tmp_path / "counts")  # no suffix: written as given
    loaded = PerImageCounts.load(tmp_path / "counts")
    parts = [PerImageCounts(counts.names[k::2], counts.counts[k::2], counts.sizes[k::2], "x") for k in (1, 0)]
    joined = PerImageCounts.concatenate(parts)
    for other in (loaded, joined.sorted()):
        assert other.names == counts.names and other.checkpoint == "x"
        assert np.array_equal(other.counts, counts.counts) and np.array_equal(other.sizes, counts.sizes)


def test_unreadable_counts_file_is_one_paragraph_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "per_image_validation.npz"
    bad.write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(UserError, match="could not read the per-image counts .*per_image_validation.npz.*Delete it"):
        PerImageCounts.load(bad)
    np.savez(tmp_path / "other.npz", names=np.array(["a"]), counts=np.zeros((1, 3)))  # another layout
    with pytest.raises(UserError, match="other.npz"):
        PerImageCounts.load(tmp_path / "other.npz")


def test_ade20k_sized_file_is_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 5000, size=(2000, 150, 3)) * (rng.random((2000, 150, 1)) < 20 / 150)  # 20 classes each
    PerImageCounts([f"im{i}" for i in range(2000)], counts, rng.integers(0, 1000, size=(2000, 3, 3)), "x").save(
        tmp_path / "c.npz")
    assert (tmp_path / "c.npz").stat().st_size < 3_000_000


# ------------------------------------------------------------------------------------------- object sizes
def flood_fill(label: np.ndarray) -> np.ndarray:
    """Reference: 4-connected regions of equal labels by breadth-first search (-1 on ignored pixels)."""
    h, w = label.shape
    out = np.full((h, w), -1, dtype=np.int64)
    count = 0
    for y in range(h):
        for x in range(w):
            if label[y, x] == IGNORE_INDEX or out[y, x] >= 0:
                continue
            out[y, x], queue = count, deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and out[ny, nx] < 0 and label[ny, nx] == label[cy, cx]:
                        out[ny, nx] = count
                        queue.append((ny, nx))
            count += 1
    return out


def test_regions_and_size_buckets_match_a_flood_fill() -> None:
    rng = np.random.default_rng(4)
    u_shape = np.zeros((9, 9), np.int64)  # regions that join late: a U joined at its bottom, a nested U
    u_shape[1:8, 1] = u_shape[7, 1:8] = u_shape[1:8, 7] = 1
    u_shape[1:6, 3] = u_shape[1:6, 5] = u_shape[5, 3:6] = 2
    labels = [u_shape] + [np.kron(rng.integers(0, 4, size=(11, 14)), np.ones((3, 3), np.int64))[:30, :40]
                          for _ in range(20)]
    for label in labels:
        label[rng.random(label.shape) < 0.05] = IGNORE_INDEX
        regions, area, classes = label_regions(label)
        reference = flood_fill(label)
        pairs = np.unique(np.stack([regions.ravel(), reference.ravel()]), axis=1)
        assert pairs.shape[1] == len(np.unique(reference)) == len(np.unique(regions))  # the same partition
        assert np.array_equal(area, np.bincount(regions[regions >= 0])) and area.size == classes.size
        assert all((label[regions == k] == classes[k]).all() for k in range(area.size))
        correct = rng.random(label.shape) < 0.7
        small, large = np.array([32**2, 96**2]) * label.size / (640 * 480)  # COCO's, scaled: 4 and 36 pixels for 30x40
        expected = np.zeros((3, 3), np.int64)
        for k in range(reference.max() + 1):
            mask = reference == k
            expected[np.digitize(mask.sum(), [small, large])] += [(correct & mask).sum(), mask.sum(), 1]
        assert np.array_equal(size_counts(correct, label), expected)


# ------------------------------------------------------------------------------------------- small things
def test_identical_runs_differ_by_exactly_zero() -> None:
    counts = counts_of(random_maps(np.random.default_rng(6), 60, 8), 8)
    r = compare_sides([counts], [counts])
    rows = [r["miou"], *r["thirds"].values(), *r["sizes"].values(), *r["classes"]]
    assert all(row["diff"] in (0.0, None) and row["low"] in (0.0, None) and row["high"] in (0.0, None) for row in rows)
    assert r["miou"]["p"] == 1.0 and not any(c["bh"] for c in r["classes"])
    with warnings.catch_warnings():  # three equal seeds a side: Welch's p is undefined in scipy, 1 here, silently
        warnings.simplefilter("error")
        r = compare_sides([counts] * 3, [counts] * 3)
    rows = [r["miou"], *r["thirds"].values(), *r["sizes"].values(), *r["classes"]]
    seeds = [row["seeds"] for row in rows if row["seeds"] is not None and row["seeds"]["low"] is not None]
    assert seeds and all(abs(s["low"]) < 1e-9 and abs(s["high"]) < 1e-9 and s["p"] == 1.0 for s in seeds)


def test_pairing_is_checked() -> None:
    pairs = random_maps(np.random.default_rng(7), 6, 4)
    a = counts_of(pairs, 4)
    with pytest.raises(ValueError, match="same images"):
        compare_sides([a], [counts_of(pairs[:5], 4)])
    shuffled = PerImageCounts(a.names[::-1], a.counts[::-1], a.sizes[::-1], "x")
    with pytest.raises(ValueError, match="same images"):
        compare_sides([a], [shuffled])
    assert compare_sides([a], [shuffled.sorted()])["miou"]["diff"] == 0.0


def test_seeds_needed_matches_cohens_table() -> None:
    # Cohen (1988), Table 2.4.1: n per group for power 0.80 at two-sided alpha 0.05: d = 0.5 -> 64, 0.8 -> 26, 1.0 -> 17
    assert [st.seeds_needed(d, 1.0) for d in (0.5, 0.8, 1.0)] == [64, 26, 17]
    assert st.seeds_needed(-2.0, 2.0) == 17 and st.seeds_needed(0.01, 5.0) is None
    assert st.seed_spread([30.0, 31.0], [32.0, 33.0, 37.0]) == pytest.approx(np.sqrt((0.5 + 14) / 3))
    assert st.seed_spread([30.0], [32.0]) is None


def test_recipe_interval_is_welch_from_three_seeds_a_side_and_classes_need_30_images() -> None:
    rng = np.random.default_rng(8)
    labels = [t.numpy() for _, t in random_maps(rng, 30, 6)]
    for label in labels:
        label[0] = 0  # class 0 in every image, the others in fewer

    def run(noise: float) -> PerImageCounts:
        preds = [np.where(rng.random(t.shape) < noise, rng.integers(0, 6, t.shape), np.where(t == IGNORE_INDEX, 0, t))
                 for t in labels]
        return counts_of([(torch.from_numpy(p), torch.from_numpy(t)) for p, t in zip(preds, labels)], 6)

    a, b = [run(0.4) for _ in range(3)], [run(0.3) for _ in range(3)]
    r = compare_sides(a, b)
    miou = [[metrics_from_counts(*x.counts.sum(0).T)["mIoU"] for x in side] for side in (b, a)]
    welch = stats.ttest_ind(*miou, equal_var=False)
    assert r["miou"]["seeds"]["low"] == pytest.approx(welch.confidence_interval().low)
    assert r["miou"]["seeds"]["p"] == pytest.approx(welch.pvalue)
    assert r["miou"]["diff"] == pytest.approx(np.mean(r["seed_mious"][1]) - np.mean(r["seed_mious"][0]))
    assert compare_sides(a[:2], b)["miou"]["seeds"] is None  # 2 seeds a side: no claim about the recipe
    assert [(c["class"], c["images"], c["low"] is not None) for c in r["classes"]][0] == (0, 30, True)
    assert all(c["low"] is None and c["seeds"]["low"] is None for c in r["classes"] if c["images"] < 30)


def test_false_discoveries_are_benjamini_hochberg() -> None:
    p = np.array([0.001, 0.02, 0.03, 0.5, np.nan, 0.04])
    # sorted 0.001, 0.02, 0.03, 0.04, 0.5 against 0.05 * k / 5: 0.01, 0.02, 0.03, 0.04 -> the first four survive
    assert st.false_discoveries(p).tolist() == [True, True, True, False, False, True]
    assert st.false_discoveries(np.array([0.04, 0.5])).tolist() == [False, False]


# ------------------------------------------------------------------------------------------- coverage
CLASSES = 10
IMAGE_AREA = 512 * 683  # an ADE20K validation image


def simulate(rng: np.random.Generator, images: int, seeds: int) -> dict[str, Any]:
    """Per-image counts of ``seeds`` runs a side drawn from a known model, with the model's parameters.

    Class c is in an image with probability 0.9 down to 0.015 (geometric); its union U there covers 0.01 % to 80 % of
    the image (log-uniform: a few images carry a class). A run's intersection is U times a rate: the run's quality of
    the class + the image's difficulty (shared by all runs, so pairing matters) + the run's own per-image noise (mean
    0). Side b's qualities are side a's plus a gain per class; each seed shifts all classes and each class (training
    randomness). Size buckets are three more such columns. A warp changes each image's unions, and every rate drops by
    the run's own drop. Rates do not depend on U, so a run's population IoU is its quality.
    """
    columns = CLASSES + 3
    presence = np.concatenate([np.geomspace(0.9, 0.015, CLASSES), [0.8, 0.6, 0.4]])
    area = IMAGE_AREA * np.exp(rng.uniform(np.log(1e-4), np.log(0.8), (images, columns)))
    union = (rng.random((images, columns)) < presence) * area
    warped_union = union[:, :CLASSES] * rng.lognormal(0.0, 0.3, (images, CLASSES))
    gain, drop_gain = rng.normal(0.01, 0.02, columns), rng.normal(0.0, 0.01, CLASSES)
    side = np.arange(2)[:, None, None]
    quality = rng.uniform(0.3, 0.6, columns) + side * gain + rng.normal(0, 0.01, (2, seeds, 1)) + rng.normal(
        0, 0.01, (2, seeds, columns))
    drop = rng.uniform(0.02, 0.06, CLASSES) + side * drop_gain + rng.normal(0, 0.005, (2, seeds, CLASSES))
    difficulty, noise = rng.uniform(-0.2, 0.2, (images, columns)), rng.normal(0, 0.15, (2, seeds, images, columns))
    rate = quality[:, :, None] + difficulty + noise
    warped_rate = rate[..., :CLASSES] - drop[:, :, None] + rng.normal(0, 0.05, (2, seeds, images, CLASSES))
    names = [f"im{i}" for i in range(images)]
    u, pixels = union[:, :CLASSES], union[:, CLASSES:]

    def counts(inter: np.ndarray, union: np.ndarray, sizes: np.ndarray) -> PerImageCounts:
        return PerImageCounts(names, np.stack([inter, union, union], -1), np.stack([sizes, pixels, pixels], -1), "")

    runs = [[counts(u * r[:, :CLASSES], u, pixels * r[:, CLASSES:]) for r in rates] for rates in rate]
    warped = [[counts(warped_union * w, warped_union, pixels) for w in rates] for rates in warped_rate]
    return {"runs": runs, "warped": warped, "quality": quality, "drop": drop, "gain": gain, "drop_gain": drop_gain}


def covered(result: dict, kind: str, per_column: np.ndarray, change: float) -> dict[str, list[bool]]:
    """Whether each interval compare.py prints holds its truth, by row type (``per_column``: the classes', then the
    size buckets' truths, in points; ``change``: the warp's). Rows without an interval are not printed."""
    classes = per_column[:CLASSES]
    rows = {"mIoU": [(result["miou"], classes.mean())],
            "thirds": [(r, classes[r["classes"]].mean()) for r in result["thirds"].values()],
            "sizes": list(zip(result["sizes"].values(), per_column[CLASSES:])),
            "change under a warp": [(r, change) for r in result["perturbed"]],
            "classes": [(c, classes[c["class"]]) for c in result["classes"]]}
    out = {}
    for name, pairs in rows.items():
        intervals = [(row["seeds"] if kind == "seeds" else row, truth) for row, truth in pairs]
        out[name] = [iv["low"] <= truth <= iv["high"] for iv, truth in intervals if iv["low"] is not None]
    return out


def coverage(images: int, seeds: int, repetitions: int = 400) -> dict[tuple[str, int], dict[str, float]]:
    """Share of the printed 95% intervals that hold their truth, per kind, seed count and row type, over the
    repetitions: the image intervals of the first seed of each side and of all ``seeds``; with enough seeds the seed
    intervals. Truths: for "these checkpoints" the runs' mean quality (b minus a), for "the recipe" the gain."""
    rng = np.random.default_rng([images, seeds])
    hits: dict[tuple[str, int], dict[str, list]] = {}
    for _ in range(repetitions):
        sim = simulate(rng, images, seeds)
        for n in sorted({1, seeds}):
            warped = [tuple(w[:n] for w in sim["warped"])]
            result = compare_sides(sim["runs"][0][:n], sim["runs"][1][:n], perturbed=warped)
            checkpoints = sim["quality"][:, :n].mean(1)
            change = -100 * (sim["drop"][1, :n] - sim["drop"][0, :n]).mean()
            cases = [("images", 100 * (checkpoints[1] - checkpoints[0]), change)]
            if n >= st.MIN_SEEDS:
                cases.append(("seeds", 100 * sim["gain"], -100 * sim["drop_gain"].mean()))
            for kind, truth, shift in cases:
                for row, values in covered(result, kind, truth, shift).items():
                    hits.setdefault((kind, n), {}).setdefault(row, []).extend(values)
    return {key: {row: float(np.mean(v)) for row, v in rows.items() if v} for key, rows in hits.items()}


@pytest.fixture(scope="module")
def ade20k_coverage() -> dict[tuple[str, int], dict[str, float]]:
    """Coverage at ADE20K's 2,000 validation images, 400 repetitions of 3 seeds a side (and their first seeds)."""
    return coverage(2000, 3)


@pytest.mark.parametrize("kind, seeds", [("images", 1), ("images", 3), ("seeds", 3)])
def test_printed_intervals_cover_the_truth_at_ade20k_size(ade20k_coverage: dict, kind: str, seeds: int,
                                                          capsys: pytest.CaptureFixture) -> None:
    measured = ade20k_coverage[kind, seeds]
    with capsys.disabled():  # the README states these: python -m pytest -s -k ade20k_size tests/test_statistics.py
        print(f"\ncoverage of the 95% {kind[:-1]} intervals at 2000 images, {seeds} seed(s) a side, 400 repetitions: "
              + ", ".join(f"{row} {value:.3f}" for row, value in measured.items()))
    assert set(measured) == {"mIoU", "thirds", "sizes", "change under a warp", "classes"}
    for row, value in measured.items():
        assert 0.92 <= value <= 0.98, f"{kind} intervals ({seeds} seeds a side) of {row}: coverage {value:.3f}"


def test_coverage_at_the_demo_size(capsys: pytest.CaptureFixture) -> None:
    measured = coverage(40, 1)["images", 1]  # the README states these: python -m pytest -s -k demo_size ...
    with capsys.disabled():
        print("\ncoverage of the 95% image intervals at 40 images, 400 repetitions: "
              + ", ".join(f"{row} {value:.3f}" for row, value in measured.items()))
    assert measured["mIoU"] >= 0.85  # the mIoU interval still mostly covers the truth on a small test set


def test_classes_in_few_images_get_no_interval_because_they_are_covered_less(monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(st, "MIN_IMAGES", 1)  # every class with ground truth gets an interval here
    rng = np.random.default_rng(5)
    hits: dict[str, list[bool]] = {"10-19": [], "20-29": [], "30 or more": []}
    for _ in range(200):
        sim = simulate(rng, 300, 1)
        result = compare_sides(sim["runs"][0], sim["runs"][1])
        truth = 100 * (sim["quality"][1, 0] - sim["quality"][0, 0])
        for c in result["classes"]:
            if c["images"] >= 10:
                bin_ = "10-19" if c["images"] < 20 else "20-29" if c["images"] < 30 else "30 or more"
                hits[bin_].append(c["low"] <= truth[c["class"]] <= c["high"])
    measured = {k: float(np.mean(v)) for k, v in hits.items()}
    with capsys.disabled():  # the README states these: python -m pytest -s -k few_images tests/test_statistics.py
        print("\ncoverage of the 95% per-class image intervals by images with the class (300 images, 200 repetitions): "
              + ", ".join(f"{k} {v:.3f} ({len(hits[k])} intervals)" for k, v in measured.items()))
    assert measured["10-19"] < 0.93 <= measured["30 or more"]
