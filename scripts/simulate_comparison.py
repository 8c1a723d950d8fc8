"""How often compare.py's intervals hold the truth: its statistics on simulated evaluations of two recipes.

A simulated validation set like ADE20K's: 150 classes, class ``c`` in an image with probability 0.9 down to 0.005
(geometric), its ground truth covering 0.01 % to 60 % of a 512x683 image (log-uniform: a few images carry a class).
Each run of a recipe (a seed) is per-image confusion counts: its true positives are the ground truth times a rate,
and its union adds boundary errors (a share of the ground truth) and false-positive blobs (a blob of the class in an
image, its place fixed by the image, predicted by a run with the recipe's probability). The rate is the recipe's
quality of the class, plus the seed's shift (all classes, and each class), plus the image's difficulty (shared by
every run: pairing matters), plus a **recipe-by-image effect** (how much better the recipe does on this image, shared
by the recipe's seeds; ``--effect``, its standard deviation), plus the run's own noise on the image. Size buckets are
three more such columns with pixel recall; a warp scales each image's areas and multiplies every rate by one minus
the recipe's drop for the class (plus the seed's shift of it). Every term is bounded (uniform), so no rate leaves
[0, 1] and the truths are exact:

- *these checkpoints, on other images like these*: each run's value on infinitely many images (its rates' means
  over the images in ratios of expected pixels), averaged over the runs of a side;
- *the recipe, on these images*: the mean over seeds on the simulated images (the expected counts over the runs'
  noise and blobs; the union's variance enters IoU's expectation to second order);
- *the recipe, on other images like these*: the mean over seeds and images, which the recipe-by-image effect
  leaves unchanged.

The table gives, for every row type compare.py prints, the share of its 95 % intervals that held the truth; in
worlds where the recipes are equal (``null``), the share that excluded 0 (for the recipe on other images a false
claim; for these checkpoints, and for the recipe on these images where there is a recipe-by-image effect, a true
difference that is no evidence about the recipes). Example (the table in docs/statistics.md):

    python scripts/simulate_comparison.py --images 2000 --seeds 3 5 --repetitions 400
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from configs import UserError
from engine.console import command_line
from engine.statistics import MIN_SEEDS, PerImageCounts, compare_sides

CLASSES = 150
SIZES = 3
IMAGE = 512 * 683  # pixels of a typical ADE20K validation image
PRESENCE = np.geomspace(0.9, 0.005, CLASSES)  # share of the images holding each class
SIZE_PRESENCE = np.array([0.9, 0.8, 0.6])  # share of the images holding small, medium and large regions
AREA, BLOB, SIZE_AREA = (1e-4, 0.6), (1e-4, 0.05), (0.01, 0.5)  # log-uniform shares of the image
DIFFICULTY, NOISE, SEED_SHIFT, SEED_CLASS_SHIFT = 0.08, 0.08, 0.01, 0.02  # half-widths of uniform terms of the rate
MOST_EFFECT = 0.1  # the largest recipe-by-image standard deviation that keeps every rate in [0, 1]
ROWS = ("mIoU", "thirds", "sizes", "change under a warp", "classes")
# The intervals compare.py prints, what each is about (its truth), and (last) Welch's read as about other images too,
# as compare.py printed it before its seeds x images interval.
KINDS = {("images", "checkpoints"): "these checkpoints, other images (jackknife)",
         ("seeds", "these images"): "the recipe, these images (Welch)",
         ("seeds_and_images", "other images"): "the recipe, other images (seeds x images)",
         ("seeds", "other images"): "Welch read as the recipe on other images (not printed)"}


def log_uniform(rng: np.random.Generator, bounds: tuple[float, float], size: Any) -> np.ndarray:
    return np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]), size))


def log_uniform_mean(bounds: tuple[float, float]) -> float:
    return (bounds[1] - bounds[0]) / np.log(bounds[1] / bounds[0])


@dataclass
class Recipe:
    """What a recipe does per class: quality (the mean rate; classes, then size buckets), false-positive blob
    probability, boundary errors (a share of the ground truth) and the drop of the rate under the warp."""

    quality: np.ndarray
    blobs: np.ndarray
    boundary: np.ndarray
    drop: np.ndarray


def recipes(rng: np.random.Generator, null: bool) -> tuple[Recipe, Recipe]:
    """Two recipes: b differs from a in every parameter, or (``null``) in none."""
    a = Recipe(rng.uniform(0.4, 0.6, CLASSES + SIZES), rng.uniform(0.01, 0.05, CLASSES),
               rng.uniform(0.05, 0.3, CLASSES), rng.uniform(0.02, 0.1, CLASSES))
    if null:
        return a, a
    return a, Recipe(a.quality + rng.uniform(-0.01, 0.02, CLASSES + SIZES), a.blobs * rng.uniform(0.8, 1.25, CLASSES),
                     a.boundary * rng.uniform(0.9, 1.1, CLASSES), a.drop + rng.uniform(-0.01, 0.01, CLASSES))


def iou(true_positives: np.ndarray, union: np.ndarray) -> np.ndarray:
    return 100 * true_positives / union


def expected_miou(iou_present: np.ndarray, chance_present: np.ndarray) -> float:
    """E[mean IoU over the classes present] when the classes of ``iou_present`` are always present and each other
    class is present (with IoU 0: false positives only) with its chance, independently: the count of those is
    Poisson-binomial."""
    count = np.array([1.0])
    for q in chance_present:
        count = np.convolve(count, [1 - q, q])
    return float(iou_present.sum() * (count / (len(iou_present) + np.arange(len(count)))).sum())


def simulate(rng: np.random.Generator, images: int, seeds: int, effect: float, null: bool = False) -> dict[str, Any]:
    """``seeds`` runs a side of two recipes on ``images`` simulated images, and the truths of every interval.

    Returns ``{"runs": [side a runs, side b runs], "warped": the same on the warped images, "checkpoints": [per
    side (seeds, ...) truths of each run], "these images": [per side], "other images": [per side]}``; a truth is
    ``{"iou": (150,) or (seeds, 150), "miou", "recall", "change"}`` in points.
    """
    present = rng.random((images, CLASSES)) < PRESENCE
    truth = present * log_uniform(rng, AREA, (images, CLASSES)) * IMAGE
    blob = log_uniform(rng, BLOB, (images, CLASSES)) * IMAGE
    pixels = (rng.random((images, SIZES)) < SIZE_PRESENCE) * log_uniform(rng, SIZE_AREA, (images, SIZES)) * IMAGE
    difficulty = rng.uniform(-DIFFICULTY, DIFFICULTY, (images, CLASSES + SIZES))
    warp = rng.lognormal(0.0, 0.3, (images, CLASSES))
    names = [f"im{i}" for i in range(images)]
    expected_truth, expected_blob = PRESENCE * log_uniform_mean(AREA) * IMAGE, log_uniform_mean(BLOB) * IMAGE
    result: dict[str, Any] = {k: [] for k in ("runs", "warped", "checkpoints", "these images", "other images")}
    half = np.sqrt(3) * effect  # a uniform recipe-by-image effect with standard deviation ``effect``
    for recipe in recipes(rng, null):
        by_image = rng.uniform(-half, half, (images, CLASSES + SIZES))
        shift = rng.uniform(-SEED_SHIFT, SEED_SHIFT, (seeds, 1)) + rng.uniform(
            -SEED_CLASS_SHIFT, SEED_CLASS_SHIFT, (seeds, CLASSES + SIZES))
        drop = recipe.drop + rng.uniform(-0.005, 0.005, (seeds, 1)) + rng.uniform(-0.005, 0.005, (seeds, CLASSES))
        runs, warped = [], []
        for s in range(seeds):
            rate = recipe.quality + shift[s] + difficulty + by_image + rng.uniform(-NOISE, NOISE, difficulty.shape)
            union = truth * (1 + recipe.boundary) + (rng.random(truth.shape) < recipe.blobs) * blob
            sizes = np.stack([pixels * rate[:, CLASSES:], pixels, pixels > 0], -1)
            runs.append(PerImageCounts(names, np.stack([truth * rate[:, :CLASSES], union, truth], -1), sizes, ""))
            bent = truth * warp
            union = bent * (1 + recipe.boundary) + (rng.random(truth.shape) < recipe.blobs) * blob * warp
            inter = bent * rate[:, :CLASSES] * (1 - drop[s])
            warped.append(PerImageCounts(names, np.stack([inter, union, truth], -1), sizes, ""))
        result["runs"].append(runs)
        result["warped"].append(warped)

        def population(quality: np.ndarray, drop: np.ndarray) -> dict[str, Any]:
            union = expected_truth * (1 + recipe.boundary) + recipe.blobs * expected_blob  # the warp's mean cancels
            clean = iou(expected_truth * quality[..., :CLASSES], union)
            bent = iou(expected_truth * quality[..., :CLASSES] * (1 - drop), union)
            return {"iou": clean, "miou": clean.mean(-1), "recall": 100 * quality[..., CLASSES:],
                    "change": bent.mean(-1) - clean.mean(-1)}

        result["checkpoints"].append(population(recipe.quality + shift, drop))
        result["other images"].append(population(recipe.quality, recipe.drop))
        mean_rate = recipe.quality + difficulty + by_image
        labelled = present.any(0)
        chance = 1 - np.prod(1 - recipe.blobs * np.ones((images, 1)), 0)[~labelled]

        def on_these(scale: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, float]:
            area = truth * scale
            union = (area * (1 + recipe.boundary)).sum(0) + recipe.blobs * (blob * scale).sum(0)
            spread = recipe.blobs * (1 - recipe.blobs) * ((blob * scale) ** 2).sum(0)
            value = iou((area * mean_rate[:, :CLASSES]).sum(0) * (1 - drop), union) * (1 + spread / union**2)
            return value, expected_miou(value[labelled], chance)

        clean, miou = on_these(np.ones_like(warp), np.zeros(CLASSES))
        miou_warped = on_these(warp, recipe.drop)[1]
        recall = 100 * (pixels * mean_rate[:, CLASSES:]).sum(0) / pixels.sum(0)
        result["these images"].append({"iou": clean, "miou": miou, "recall": recall, "change": miou_warped - miou})
    return result


def truths(result: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[tuple[dict, float]]]:
    """Each row of a compare_sides ``result`` with its truth, b's minus a's, by row type."""
    diff = {key: b[key] - a[key] for key in ("iou", "miou", "recall", "change")}
    return {"mIoU": [(result["miou"], diff["miou"])],
            "thirds": [(row, diff["iou"][row["classes"]].mean()) for row in result["thirds"].values()],
            "sizes": list(zip(result["sizes"].values(), diff["recall"])),
            "change under a warp": [(row, diff["change"]) for row in result["perturbed"]],
            "classes": [(row, diff["iou"][row["class"]]) for row in result["classes"]]}


def repeat(images: int, seeds: list[int], effect: float, null: bool, repetitions: int,
           seed: int = 0) -> dict[tuple[str, str, int], dict[str, dict[str, float]]]:
    """Over ``repetitions`` simulations with ``max(seeds)`` runs a side (each compared with its first n, n in
    ``seeds``): per interval kind, truth (:data:`KINDS`) and n, per row type, the share of printed intervals that
    held the truth ("covered") and that excluded 0 ("excludes 0"), and how many there were ("intervals")."""
    rng = np.random.default_rng([seed, images, int(1000 * effect), null])
    found: dict[tuple[str, str, int], dict[str, list[tuple[bool, bool]]]] = {}
    for _ in range(repetitions):
        sim = simulate(rng, images, max(seeds), effect, null)
        for n in seeds:
            result = compare_sides(sim["runs"][0][:n], sim["runs"][1][:n],
                                   perturbed=[(sim["warped"][0][:n], sim["warped"][1][:n])])
            checkpoints = [{k: v[:n].mean(0) for k, v in side.items()} for side in sim["checkpoints"]]
            for kind, population in KINDS:
                sides = checkpoints if population == "checkpoints" else sim[population]
                for row_type, pairs in truths(result, *sides).items():
                    for row, truth in pairs:
                        interval = row if kind == "images" else row[kind]
                        if interval is not None and interval["low"] is not None:
                            low, high = interval["low"], interval["high"]
                            found.setdefault((kind, population, n), {}).setdefault(row_type, []).append(
                                (low <= truth <= high, not low <= 0 <= high))
    return {key: {row: {"covered": float(np.mean([c for c, _ in hits])),
                        "excludes 0": float(np.mean([e for _, e in hits])), "intervals": len(hits)}
                  for row, hits in rows.items()} for key, rows in found.items()}


def table(images: int, seeds: list[int], effects: list[float], repetitions: int) -> str:
    """The markdown table of coverage (and, for equal recipes, how often 0 was excluded) per kind, seeds and world."""
    lines = [f"Share of 95% intervals holding the truth ({images} images, {repetitions} repetitions); for equal "
             f"recipes (null), the share excluding 0", "",
             "| world | interval | seeds a side | " + " | ".join(ROWS) + " |", "|" + "---|" * (len(ROWS) + 3)]
    for null in (False, True):
        for effect in effects:
            world = f"{'null, ' if null else ''}recipe-by-image sd {effect:g}"
            measured = repeat(images, sorted({1, *seeds}), effect, null, repetitions)
            for (kind, population, n), rows in sorted(measured.items(),
                                                      key=lambda item: (list(KINDS).index(item[0][:2]), item[0][2])):
                if null and (kind, population) == ("seeds", "other images"):
                    continue  # the same intervals as Welch's about these images: the same share excludes 0
                key = "excludes 0" if null else "covered"
                cells = [f"{rows[r][key]:.3f}" if r in rows else "-" for r in ROWS]
                label = KINDS[kind, population] + (": excludes 0" if null else "")
                lines.append(f"| {world} | {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Coverage of compare.py's 95% intervals (and how often they exclude 0 when the "
                    "recipes are equal) on simulated evaluations of two recipes with known truths.",
        epilog="example: python scripts/simulate_comparison.py --images 2000 --seeds 3 5 --repetitions 400")
    parser.add_argument("--images", type=int, default=2000, help="validation images (default 2000, ADE20K's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 5], metavar="N",
                        help=f"seeds a side, each >= {MIN_SEEDS} (default 3 5; 1 is always added for the image "
                             f"intervals)")
    parser.add_argument("--effect", type=float, nargs="+", default=[0.0, MOST_EFFECT], metavar="SD",
                        help=f"standard deviations of the recipe-by-image effect, in rate units (default 0 "
                             f"{MOST_EFFECT})")
    parser.add_argument("--repetitions", type=int, default=400, help="simulations per world (default 400)")
    return parser.parse_args(argv)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for user errors)."""
    args = parse_args(argv)
    if args.images < 2 or args.repetitions < 1 or min(args.seeds) < MIN_SEEDS:
        raise UserError(f"--images must be 2 or more, --repetitions 1 or more and every --seeds at least "
                        f"{MIN_SEEDS}; got {args.images}, {args.repetitions} and {args.seeds}.")
    if not all(0 <= e <= MOST_EFFECT for e in args.effect):
        raise UserError(f"--effect must lie in [0, {MOST_EFFECT}] (larger ones could push a rate out of [0, 1]); "
                        f"got {args.effect}.")
    print(table(args.images, args.seeds, args.effect, args.repetitions), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
