"""engine/statistics.py: per-image counts against the confusion matrix, regions against a flood fill, and the
coverage of every interval compare.py prints on data drawn from a known model."""

from __future__ import annotations

import warnings
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from configs import UserError
from data import IGNORE_INDEX
from engine import statistics as st
from engine.metric import ConfusionMatrix, metrics_from_counts
from engine.statistics import PerImageCounts, compare_sides, count_image, label_regions, size_counts
from scripts import simulate_comparison as simulation


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
    assert st.seed_spread([30.0, 31.0], [32.0, 33.0, 37.0]) == pytest.approx((np.sqrt((0.5 + 14) / 3), 3))
    assert st.seed_spread([30.0], [32.0]) is None
    # the 80% interval of a standard deviation from 4 degrees of freedom (chi-square quantiles 1.064 and 7.779)
    assert st.spread_range(1.0, 4) == pytest.approx((np.sqrt(4 / 7.7794), np.sqrt(4 / 1.0636)), rel=1e-4)


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


def test_seeds_and_images_interval_is_the_two_way_variance_decomposition() -> None:
    """With equal pixels in every image, a size bucket's recall is the mean of per-image recalls, so the interval can
    be recomputed by hand: the crossed design's three variance components (seeds, recipe by image, their noise),
    each from its mean square, combined with Satterthwaite's degrees of freedom."""
    rng = np.random.default_rng(9)
    images, seeds = 60, 3
    recall = np.clip(0.5 + rng.normal(0, 0.1, (2, 1, images)) + rng.normal(0, 0.05, (2, seeds, 1))
                     + rng.normal(0, 0.1, (2, seeds, images)), 0, 1)  # side by image, seed, noise
    counts = np.ones((images, 2, 3), np.int64)
    sides = [[PerImageCounts([f"im{i}" for i in range(images)], counts,
                             np.stack([np.round(100 * r)[:, None] * np.ones(3), 100 * np.ones((images, 3)),
                                       np.ones((images, 3))], -1), "x") for r in side] for side in recall]
    row = compare_sides(*sides)["sizes"]["small"]
    x = [100 * np.round(100 * side) / 100 for side in recall]  # (seeds, images) per-image recalls in points
    e = x[1].mean(0) - x[0].mean(0)
    d = e - e.mean()
    v_img, df_img = d.var(ddof=1) / images, min(3 * (d**2).sum() ** 2 / (d**4).sum(), images - 1)
    welch = [(side.mean(1).var(ddof=1) / seeds, seeds - 1) for side in x]
    noise = [(((side - side.mean(0) - side.mean(1, keepdims=True) + side.mean()) ** 2).sum()
              / ((seeds - 1) * (images - 1)) / (seeds * images), (seeds - 1) * (images - 1)) for side in x]
    v_seed, v_noise = sum(v for v, _ in welch), sum(v for v, _ in noise)
    assert v_seed > v_noise and v_img > v_noise  # both components present here: V = seeds + images - noise
    terms = welch + [(v_img, df_img)] + [(-v, df) for v, df in noise]
    variance = sum(v for v, _ in terms)
    df = variance**2 / sum(v**2 / k for v, k in terms)
    half = stats.t.ppf(0.975, df) * np.sqrt(variance)
    assert row["seeds_and_images"]["df"] == pytest.approx(df)
    assert row["seeds_and_images"]["high"] - row["seeds_and_images"]["low"] == pytest.approx(2 * half)
    assert row["diff"] == pytest.approx(e.mean())


def test_false_discoveries_are_benjamini_hochberg() -> None:
    p = np.array([0.001, 0.02, 0.03, 0.5, np.nan, 0.04])
    # sorted 0.001, 0.02, 0.03, 0.04, 0.5 against 0.05 * k / 5: 0.01, 0.02, 0.03, 0.04 -> the first four survive
    assert st.false_discoveries(p).tolist() == [True, True, True, False, False, True]
    assert st.false_discoveries(np.array([0.04, 0.5])).tolist() == [False, False]


# ------------------------------------------------------------------------------------------- coverage
# scripts/simulate_comparison.py simulates evaluations of two recipes (150 classes, per-image confusion counts with
# false-positive blobs, seeds, a recipe-by-image effect) with known truths; its full table (2,000 images, 400
# repetitions) is in docs/statistics.md. These are smaller versions that still tell a calibrated interval from a
# wrong one.


@pytest.fixture(scope="module")
def with_image_effect() -> dict[tuple[str, str, int], dict[str, dict[str, float]]]:
    """500 images, 1 and 3 seeds a side, a recipe-by-image effect of sd 0.1, 40 repetitions."""
    return simulation.repeat(500, [1, 3], 0.1, False, 40)


def pooled(measured: dict[str, dict[str, float]], rows: tuple[str, ...]) -> float:
    """The coverage over the intervals of several row types together."""
    count = sum(measured[r]["intervals"] for r in rows)
    return sum(measured[r]["covered"] * measured[r]["intervals"] for r in rows) / count


def test_recipe_intervals_hold_for_other_images_with_a_recipe_by_image_effect(with_image_effect: dict) -> None:
    """The seeds x images interval covers the recipe's difference on other images; Welch's over seeds alone, which
    compare.py used to print for "the recipe", does not (it treats these images as fixed), but does cover the recipe
    on these images."""
    crossed = with_image_effect["seeds_and_images", "other images", 3]
    welch_read_as_other = with_image_effect["seeds", "other images", 3]
    welch = with_image_effect["seeds", "these images", 3]
    rows = ("mIoU", "thirds", "sizes", "change under a warp")
    assert 0.93 <= crossed["classes"]["covered"] <= 0.98 and pooled(crossed, rows) >= 0.92
    assert welch["classes"]["covered"] >= 0.93 and pooled(welch, rows) >= 0.92
    assert welch_read_as_other["classes"]["covered"] < 0.85 and welch_read_as_other["thirds"]["covered"] < 0.9


def test_image_intervals_hold_for_these_checkpoints(with_image_effect: dict) -> None:
    for seeds in (1, 3):
        measured = with_image_effect["images", "checkpoints", seeds]
        assert measured["classes"]["covered"] >= 0.93 and pooled(measured, simulation.ROWS) >= 0.93, measured


def test_equal_recipes_rarely_differ_on_other_images_and_checkpoints_mark_no_class() -> None:
    """Equal recipes, with and without a recipe-by-image effect, seeds spread apart: the recipe intervals on other
    images exclude 0 about 5% of the time (Welch's, which take these images as fixed, do far more often with the
    effect); with 1 seed a side the per-class rows (checkpoint differences: the seeds differ) exclude 0 far more
    often too, and get no Benjamini-Hochberg mark."""
    rng = np.random.default_rng(11)
    excluded: dict[float, list[bool]] = {0.0: [], 0.1: []}
    checkpoint_excluded, marked, welch_excluded = [], [], []
    for effect in excluded:
        for _ in range(15):
            sim = simulation.simulate(rng, 400, 3, effect, null=True)
            result = compare_sides(sim["runs"][0], sim["runs"][1])
            rows = [result["miou"], *result["thirds"].values(), *result["sizes"].values(), *result["classes"]]
            excluded[effect] += [not r["seeds_and_images"]["low"] <= 0 <= r["seeds_and_images"]["high"] for r in rows
                                 if r["seeds_and_images"]["low"] is not None]
            welch_excluded += [not r["seeds"]["low"] <= 0 <= r["seeds"]["high"] for r in rows
                                if effect > 0 and r["seeds"]["low"] is not None]
            single = compare_sides(sim["runs"][0][:1], sim["runs"][1][:1])
            marked += [c["bh"] for c in single["classes"]]
            if effect == 0:
                checkpoint_excluded += [not c["low"] <= 0 <= c["high"] for c in single["classes"]
                                        if c["low"] is not None]
    assert all(np.mean(v) <= 0.08 and len(v) > 500 for v in excluded.values()), [np.mean(v) for v in excluded.values()]
    assert np.mean(welch_excluded) > 0.15
    assert np.mean(checkpoint_excluded) > 0.15 and not any(marked)


def test_classes_in_few_images_get_no_interval_because_they_are_covered_less(monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(st, "MIN_IMAGES", 1)  # every class with ground truth gets an interval here
    rng = np.random.default_rng(5)
    hits: dict[str, list[bool]] = {"10-19": [], "20-29": [], "30 or more": []}
    for _ in range(40):
        sim = simulation.simulate(rng, 300, 1, 0.1)
        result = compare_sides(sim["runs"][0], sim["runs"][1])
        truth = sim["checkpoints"][1]["iou"][0] - sim["checkpoints"][0]["iou"][0]
        for c in result["classes"]:
            if c["images"] >= 10:
                bin_ = "10-19" if c["images"] < 20 else "20-29" if c["images"] < 30 else "30 or more"
                hits[bin_].append(c["low"] <= truth[c["class"]] <= c["high"])
    measured = {k: float(np.mean(v)) for k, v in hits.items()}
    with capsys.disabled():  # docs/statistics.md quotes: python -m pytest -s -k few_images tests/test_statistics.py
        print("\ncoverage of the 95% per-class image intervals by images with the class (300 images, 40 repetitions): "
              + ", ".join(f"{k} {v:.3f} ({len(hits[k])} intervals)" for k, v in measured.items()))
    assert measured["10-19"] < 0.93 <= measured["30 or more"]


def test_the_simulation_refuses_what_it_cannot_simulate(capsys: pytest.CaptureFixture) -> None:
    assert simulation.main(["--seeds", "2"]) == 2  # the recipe intervals need 3 seeds a side
    assert simulation.main(["--effect", "0.2"]) == 2  # a rate could leave [0, 1]
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "--seeds" in err and "--effect must lie in [0, 0.1]" in err
