"""Per-image counts of an evaluation, and the statistics that say whether a difference in mIoU is real.

Where the methods come from:

- **Per-image counts.** A class's intersection, union and ground-truth pixels add up over images, so per-image counts
  (images x classes x fields, saved with numpy) give the dataset metric of engine/metric.py exactly, and leaving an
  image out is subtracting its row (:func:`leave_one_image_out`, the one resampling; every family of statistics,
  :data:`FAMILIES`, goes through it by name).
- **These checkpoints, other images: the paired jackknife over images** (Quenouille 1956, Tukey 1958; Efron & Stein
  1981). Each image in turn is left out of every run of both sides at once (its counts subtracted from the sums), so
  image difficulty cancels; a side with several seeds is the mean of its seeds. The interval is Student's t with the
  jackknife standard error and Satterthwaite's (1946) degrees of freedom over the images' contributions (as Bell &
  McCaffrey 2002 for clustered errors): a difference that a few images carry gets few degrees of freedom. Class
  areas are heavy-tailed, and there a percentile bootstrap's intervals are too narrow.
- **The recipe (other seeds), on these images: Welch's t** over the per-seed values, given with at least ``MIN_SEEDS``
  seeds a side.
- **The recipe (other seeds), on other images like these: seeds x images.** Seeds and images are crossed random
  factors; a recipe's advantage varies from image to image (a recipe-by-image effect shared by its seeds), which
  Welch's t over seeds alone takes as fixed. The variance has three components, each estimated by the method of
  moments from a mean square and kept at 0 or more (Searle, Casella & McCulloch 1992, ch. 4): the seeds', the
  recipe-by-image one, and the seed-by-image noise that both the seed and the image mean squares contain (from the
  two-way residuals of the runs' jackknife pseudo-values); Student's t with Satterthwaite's degrees of freedom.
  With fewer seeds, :func:`seeds_needed`: the seeds a side for which a two-sided t test at 5 % detects a difference
  with 80 % power (noncentral t, Cohen 1988), seeds normal with the observed spread on both sides.
- **Many classes at once:** Benjamini & Hochberg (1995) over the classes of a per-class table
  (scipy.stats.false_discovery_control), with the p-values of the recipe on other images; with fewer seeds the rows
  are differences of these checkpoints, which seeds alone make differ, and carry no mark.
- **Object sizes:** 4-connected ground-truth regions of each class (scipy.ndimage.label), bucketed with COCO's areas
  (32^2 and 96^2 pixels of a 640x480 image) scaled to the image; a region is a class region, not an instance.
- **Effective dilation** (Dai et al. 2017, Table 2: the measure, not its categories, which are object instances by
  box area) per layer, summed over those regions: thing-class regions in thirds by area, stuff-class regions (each
  without fragments, regions under 0.1 % of the image), all, and per class.

scripts/simulate_comparison.py measures the coverage of every interval compare.py prints on simulated evaluations
with known truths (tests/test_statistics.py runs a smaller version). Percentages throughout; NaN where a value is
undefined (no union).
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from configs import UserError
from data import IGNORE_INDEX
from engine.metric import class_iou, json_value, mean_iou
from engine.workdir import write_whole

SIZE_BUCKETS = ("small", "medium", "large")
THIRDS = ("frequent", "medium", "rare")
COCO_SMALL, COCO_LARGE, COCO_IMAGE = 32**2, 96**2, 640 * 480
MIN_SEEDS = 3  # seeds a side from which an interval over seeds is given (the simulations cover 3 and more)
MIN_IMAGES = 30  # images with ground truth from which a third, class or size bucket gets an interval (fewer are
# covered less often: tests/test_statistics.py, test_classes_in_few_images_get_no_interval_...)
STUDY_DIFFERENCE = 1.41  # the reference study's def-conv-v2 minus norm-conv (23.59 - 22.18, one run each)


# ------------------------------------------------------------------------------------------- per-image counts
def count_image(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One prediction against its label (HxW tensors, any device): (C, 3) int64 intersection, union and ground-truth
    pixels per class, counted where ``pred`` is, and :func:`size_counts`."""
    label = label.to(pred.device)
    valid = label != IGNORE_INDEX
    truth, guess = label[valid].long(), pred[valid].long()
    gt = torch.bincount(truth, minlength=num_classes)
    predicted = torch.bincount(guess, minlength=num_classes)
    if gt.numel() != num_classes or predicted.numel() != num_classes:
        raise ValueError(f"labels or predictions outside 0..{num_classes - 1} (other than {IGNORE_INDEX})")
    inter = torch.bincount(truth[truth == guess], minlength=num_classes)
    counts = torch.stack([inter, gt + predicted - inter, gt], 1).cpu().numpy()
    return counts, size_counts((pred == label).cpu().numpy(), label.cpu().numpy())


def label_regions(label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected regions of each class of an HxW label map: (region id per pixel, -1 where ignored; area and
    class per region)."""
    regions = np.full(label.shape, -1, dtype=np.int64)
    classes = []
    for value, box in enumerate(ndimage.find_objects(label.astype(np.int64) + 1)):
        if box is None or value == IGNORE_INDEX:
            continue
        parts, count = ndimage.label(label[box] == value)  # the default structure is 4-connectivity
        inside = parts > 0
        regions[box][inside] = parts[inside] + len(classes) - 1
        classes += [value] * count
    area = np.bincount(regions[regions >= 0], minlength=len(classes))
    return regions, area, np.array(classes, dtype=np.int64)


def size_counts(correct: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(3, 3) int64: per size bucket (small, medium, large regions of the ground truth), correctly predicted pixels,
    ground-truth pixels and regions. Recall per bucket = correct / pixels, additive over images."""
    regions, area, _ = label_regions(label)
    inside = regions >= 0
    hits = np.bincount(regions[inside], weights=correct[inside], minlength=area.size)
    bucket = np.digitize(area, np.array([COCO_SMALL, COCO_LARGE]) * (label.size / COCO_IMAGE))  # COCO's, scaled
    columns = [np.bincount(bucket, weights=w, minlength=3) for w in (hits, area, None)]
    return np.stack(columns, 1).astype(np.int64)


@dataclass
class PerImageCounts:
    """One evaluation's per-image counts, rows in the order of ``names``.

    ``counts`` is (images, classes, intersection/union/gt) and ``sizes`` (images, :data:`SIZE_BUCKETS`,
    correct/pixels/regions), int64; ``checkpoint`` is the sha256 of the checkpoint file whose predictions they count.
    """

    names: list[str]
    counts: np.ndarray
    sizes: np.ndarray
    checkpoint: str

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, np.ndarray, np.ndarray]], num_classes: int,
                  checkpoint: str) -> PerImageCounts:
        """Stack ``(name, counts, sizes)`` rows of :func:`count_image`."""
        if not rows:
            return cls([], np.zeros((0, num_classes, 3), np.int64), np.zeros((0, 3, 3), np.int64), checkpoint)
        return cls([r[0] for r in rows], np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows]), checkpoint)

    def sorted(self) -> PerImageCounts:
        """The same counts with the images sorted by name (a canonical order, e.g. after gathering processes)."""
        order = sorted(range(len(self.names)), key=self.names.__getitem__)
        return PerImageCounts([self.names[i] for i in order], self.counts[order], self.sizes[order], self.checkpoint)

    @classmethod
    def concatenate(cls, parts: Sequence[PerImageCounts]) -> PerImageCounts:
        """Join the parts of one evaluation (one per process)."""
        return cls([n for p in parts for n in p.names], np.concatenate([p.counts for p in parts]),
                   np.concatenate([p.sizes for p in parts]), parts[0].checkpoint)

    def save(self, path: Path) -> None:
        """Write a compressed .npz (no pickles) at ``path`` as given, whole (``engine.workdir.write_whole``)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, names=np.array(self.names, dtype=str), counts=self.counts, sizes=self.sizes,
                            checkpoint=np.array(self.checkpoint))
        write_whole(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> PerImageCounts:
        """Read a file written by :meth:`save`; UserError naming it when it is unreadable or of another layout."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["names"].tolist(), z["counts"], z["sizes"], str(z["checkpoint"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(
                f"could not read the per-image counts {path} ({type(err).__name__}: {err}): it is damaged or was not "
                f"written by this version's evaluate.py --per-image. Delete it; compare.py then evaluates the run "
                f"again."
            ) from None


# ------------------------------------------------------------------------------------------- comparing two sides
FAMILIES = ("miou", "thirds", "classes", "sizes", "perturbed")  # what a comparison measures, by name
COUNTED = ("thirds", "classes", "sizes")  # families whose members need MIN_IMAGES images with ground truth
Named = dict[str, np.ndarray]  # arrays by family (or by kind of counts)


def _counts_by_name(side: list[PerImageCounts], perturbed: list[list[PerImageCounts]]) -> Named:
    """A side's per-image numerators and denominators, float64, by name: "classes" (images, runs, 2, classes:
    intersection and union), "sizes" (images, runs, 2, size buckets: correctly predicted and ground-truth pixels)
    and "perturbed" (images, runs, perturbations, 2, classes: as "classes", on each perturbation's images)."""
    def ratio_counts(runs: list[PerImageCounts], field: str) -> np.ndarray:
        return np.stack([getattr(r, field)[..., :2] for r in runs], 1).transpose(0, 1, 3, 2).astype(np.float64)

    classes = ratio_counts(side, "counts")
    warped = [ratio_counts(runs, "counts") for runs in perturbed]
    return {"classes": classes, "sizes": ratio_counts(side, "sizes"),
            "perturbed": np.stack(warped, 2) if warped else np.zeros(classes.shape[:2] + (0, *classes.shape[2:]))}


def _families(sums: Named, classes: np.ndarray, thirds: list[np.ndarray]) -> Named:
    """Every family of statistics, (..., runs, members), from counts summed over images (:func:`_counts_by_name`):
    mIoU, each third's mean IoU, each class's IoU, each size bucket's pixel recall and each perturbation's change of
    mIoU from the clean images."""
    iou = class_iou(sums["classes"][..., 0, :], sums["classes"][..., 1, :])
    miou = mean_iou(iou)
    warped = mean_iou(class_iou(sums["perturbed"][..., 0, :], sums["perturbed"][..., 1, :]))
    return {"miou": miou[..., None], "thirds": np.stack([mean_iou(iou[..., t]) for t in thirds], -1),
            "classes": iou[..., classes], "sizes": class_iou(sums["sizes"][..., 0, :], sums["sizes"][..., 1, :]),
            "perturbed": warped - miou[..., None]}


def leave_one_image_out(counts: Named, statistics: Callable[[Named], Named]) -> tuple[Named, Named]:
    """The one resampling of a comparison: ``statistics`` of the named per-image ``counts`` summed over the images
    (axis 0), and of those sums with each image left out in turn (its counts subtracted), the jackknife's replicates
    with the images as a new first axis."""
    total = {name: c.sum(0) for name, c in counts.items()}
    return statistics(total), statistics({name: total[name] - c for name, c in counts.items()})


def _jackknife(left_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jackknife variance over images of the statistics whose (images, ..., statistics) values with each image left
    out are ``left_out``, and its degrees of freedom by Satterthwaite's rule over the images' contributions d_i (each
    contribution's squared variance estimated by d_i^4 / 3, normal), at most images - 1. NaN-aware."""
    deviation = left_out - np.nanmean(left_out, 0)
    n = (~np.isnan(left_out)).sum(0)
    squares = np.nansum(deviation**2, 0)
    return (n - 1) / n * squares, np.minimum(3 * squares**2 / np.nansum(deviation**4, 0), n - 1)


def _interval(point: np.ndarray, terms: Sequence[tuple[np.ndarray, Any]], confidence: float) -> dict[str, np.ndarray]:
    """Student's t interval and p-value of ``point`` whose variance is the sum of the ``terms`` (variance estimate,
    its degrees of freedom; a coefficient of -1 or 0 is allowed), with Satterthwaite's (1946) degrees of freedom.
    A zero variance gives the point itself and p = 1 where the point is 0 (else 0)."""
    variance = sum(v for v, _ in terms)
    df = variance**2 / sum(v**2 / d for v, d in terms)
    se = np.sqrt(variance)
    half = np.where(se > 0, stats.t.ppf((1 + confidence) / 2, df) * se, 0.0)
    p = np.where(se > 0, 2 * stats.t.sf(np.abs(point) / np.where(se > 0, se, 1.0), df), (point == 0) * 1.0)
    return {"low": point - half, "high": point + half, "p": p, "df": df}


def _intervals(point: np.ndarray, values: list[np.ndarray], left_out: list[np.ndarray], seeds: bool,
               confidence: float) -> dict[str, dict[str, np.ndarray] | None]:
    """The three intervals of ``point`` (side b's mean over its runs minus side a's), from each side's (runs,
    statistics) ``values`` and (images, runs, statistics) values with each image left out.

    - "images", these checkpoints on other images like these: the paired jackknife of the sides' means.
    - "seeds", the recipe on these images (other seeds): Welch's t over the runs' values.
    - "seeds_and_images", the recipe on other images like these: seeds and images are crossed random factors, and
      the variance of the difference has three components (Searle, Casella & McCulloch 1992, ch. 4): the seeds',
      s_a^2/n_a + s_b^2/n_b (Welch's); the recipe-by-image one (how the advantage varies from image to image), which
      with the seed-by-image noise makes the jackknife variance; and that noise, sum over sides of MS_E / (n N), from
      the two-way residual mean square of the runs' jackknife pseudo-values. Each component is estimated by the
      method of moments and kept at 0 or more; the degrees of freedom are Satterthwaite's.
    """
    images_variance, images_df = _jackknife(np.nanmean(left_out[1], 1) - np.nanmean(left_out[0], 1))
    result: dict[str, dict[str, np.ndarray] | None] = {
        "images": _interval(point, [(images_variance, images_df)], confidence), "seeds": None,
        "seeds_and_images": None}
    if not seeds:
        return result
    welch = [(v.var(0, ddof=1) / len(v), len(v) - 1) for v in values]
    noise = []
    for out in left_out:  # the seed-by-image noise: the two-way residuals of the runs' left-out values
        count, runs = out.shape[:2]
        residual = out - out.mean(0) - out.mean(1, keepdims=True) + out.mean((0, 1))
        noise.append(((count - 1) * (residual**2).sum((0, 1)) / (runs - 1) / (runs * count), (runs - 1) * (count - 1)))
    seeds_variance, noise_variance = sum(v for v, _ in welch), sum(v for v, _ in noise)
    over_seeds, over_images = seeds_variance > noise_variance, images_variance > noise_variance  # components > 0
    terms = [(v * over_seeds, d) for v, d in welch] + [(images_variance * over_images, images_df)]
    terms += [(v * (1.0 - over_seeds - over_images), d) for v, d in noise]
    result.update(seeds=_interval(point, welch, confidence), seeds_and_images=_interval(point, terms, confidence))
    return result


def seed_spread(a: Sequence[float], b: Sequence[float]) -> tuple[float, int] | None:
    """Pooled sample standard deviation over seeds of two sides and its degrees of freedom (sides with one seed add
    nothing; None if both have one)."""
    parts = [np.asarray(v, dtype=np.float64) for v in (a, b) if len(v) > 1]
    dof = sum(len(v) - 1 for v in parts)
    return (float(np.sqrt(sum(((v - v.mean()) ** 2).sum() for v in parts) / dof)), dof) if dof else None


def spread_range(spread: float, dof: int, coverage: float = 0.8) -> tuple[float, float]:
    """The central ``coverage`` confidence interval of a normal standard deviation estimated as ``spread`` with
    ``dof`` degrees of freedom (chi-square)."""
    tail = (1 - coverage) / 2
    return spread * np.sqrt(dof / stats.chi2.ppf(1 - tail, dof)), spread * np.sqrt(dof / stats.chi2.ppf(tail, dof))


def seeds_needed(difference: float, spread: float, power: float = 0.8, alpha: float = 0.05,
                 most: int = 1000) -> int | None:
    """Seeds a side for which a two-sided two-sample t test at level ``alpha`` detects ``difference`` with ``power``
    (noncentral t), seeds normal with standard deviation ``spread`` on both sides; None beyond ``most``."""
    if spread == 0:
        return 2
    n = np.arange(2, most + 1)
    df = 2 * n - 2
    shift = abs(difference) / (spread * np.sqrt(2 / n))
    critical = stats.t.ppf(1 - alpha / 2, df)
    reached = stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift) >= power
    return int(n[reached.argmax()]) if reached.any() else None


def _rows(values: list[np.ndarray], left_out: list[np.ndarray], carried: Sequence[int], counted: bool, seeds: bool,
          confidence: float) -> list[dict[str, Any]]:
    """One family's rows (see :func:`compare_sides`) from both sides' (runs, members) values and (images, runs,
    members) values with each image left out, and the images that carry each member; ``counted``: a member carried by
    fewer than :data:`MIN_IMAGES` images gets no interval."""
    with warnings.catch_warnings():  # NaN where a statistic is undefined in every run (no union), without warnings
        warnings.simplefilter("ignore", RuntimeWarning)
        ma, mb = (np.nanmean(v, -2) for v in values)
        intervals = _intervals(mb - ma, values, left_out, seeds, confidence)
    if counted:
        few = np.asarray(carried) < MIN_IMAGES
        for part in intervals.values():
            for array in (part or {}).values():
                array[few] = np.nan
    cells = {"a": ma, "b": mb, "diff": mb - ma, **intervals["images"]}
    return [{**{key: json_value(v[i]) for key, v in cells.items()},
             **{kind: None if part is None else {key: json_value(v[i]) for key, v in part.items()}
                for kind, part in intervals.items() if kind != "images"}, "images": int(n)}
            for i, n in enumerate(carried)]


def compare_sides(
    a: list[PerImageCounts], b: list[PerImageCounts], *,
    perturbed: Sequence[tuple[list[PerImageCounts], list[PerImageCounts]]] = (), confidence: float = 0.95,
) -> dict[str, Any]:
    """Side b against side a (runs of each, one per seed) on the same validation images.

    ``perturbed`` holds per perturbation both sides' counts on the perturbed images (the same runs in the same order).
    Thirds, classes and size buckets with ground truth in fewer than :data:`MIN_IMAGES` images get no interval. With
    :data:`MIN_SEEDS` seeds a side or more, the class rows with an interval are marked where they survive
    Benjamini-Hochberg over those classes with the p-values of the recipe on other images; with fewer, the rows are
    differences of these checkpoints, and none is marked. ValueError if the runs were not evaluated on the same
    images with the same ground truth.

    Returns ``{"images", "seeds": [n_a, n_b], "seed_mious": [[...], [...]], "miou": row, "thirds": {third: row +
        "classes"}, "classes": [row + "class", "bh"], "sizes": {bucket: row}, "perturbed": [row per perturbation: the
        change of mIoU from the clean images]}``, each row ``{"a", "b", "diff", "low", "high", "p", "df", "seeds",
        "seeds_and_images", "images"}``: the interval of these checkpoints on other images like these (over images),
        ``{"low", "high", "p", "df"}`` of the recipe on these images (over seeds) and of the recipe on other images
        like these (seeds x images), each None with fewer seeds, and the images that carry the row; None for NaN.
    """
    for runs in [a + b] + [pair[0] + pair[1] for pair in perturbed]:
        for run in runs:
            if run.names != a[0].names or not np.array_equal(run.counts[..., 2], runs[0].counts[..., 2]):
                raise ValueError(f"the runs were not evaluated on the same images with the same labels "
                                 f"({len(run.names)} vs {len(a[0].names)} images)")
    gt = a[0].counts[..., 2].sum(0)
    classes = np.flatnonzero(gt > 0)
    thirds = dict(zip(THIRDS, np.array_split(classes[np.lexsort((classes, -gt[classes]))], 3)))  # by pixels, ties by id
    (va, va_out), (vb, vb_out) = (
        leave_one_image_out(_counts_by_name(side, [pair[i] for pair in perturbed]),
                            lambda sums: _families(sums, classes, list(thirds.values())))
        for i, side in enumerate((a, b)))
    labelled = a[0].counts[..., 2] > 0  # (images, classes)
    carried = {"miou": [len(labelled)], "thirds": [labelled[:, t].any(1).sum() for t in thirds.values()],
               "classes": labelled[:, classes].sum(0), "sizes": (a[0].sizes[..., 1] > 0).sum(0),
               "perturbed": [len(labelled)] * len(perturbed)}
    seeds = min(len(a), len(b)) >= MIN_SEEDS
    rows = {name: _rows([va[name], vb[name]], [va_out[name], vb_out[name]], carried[name], name in COUNTED, seeds,
                        confidence) for name in FAMILIES}
    p = np.array([np.nan if not seeds or row["seeds_and_images"]["p"] is None else row["seeds_and_images"]["p"]
                  for row in rows["classes"]])
    for row, c, bh in zip(rows["classes"], classes, false_discoveries(p, confidence)):
        row.update({"class": int(c), "bh": bool(bh)})
    return {
        "images": len(a[0].names), "seeds": [len(a), len(b)],
        "seed_mious": [va["miou"][:, 0].tolist(), vb["miou"][:, 0].tolist()], "miou": rows["miou"][0],
        "thirds": {t: {**row, "classes": thirds[t].tolist()} for t, row in zip(THIRDS, rows["thirds"])},
        "classes": rows["classes"], "sizes": dict(zip(SIZE_BUCKETS, rows["sizes"])), "perturbed": rows["perturbed"],
    }


def false_discoveries(p: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Which p-values (NaN: never) survive a Benjamini-Hochberg correction at false-discovery rate 1 - confidence."""
    keep = np.zeros(len(p), dtype=bool)
    defined = ~np.isnan(p)
    keep[defined] = stats.false_discovery_control(p[defined]) < 1 - confidence
    return keep


# ------------------------------------------------------------------------------------------- effective dilation
DILATION_BUCKETS = ("small", "medium", "large", "stuff")
FRAGMENT = 1e-3  # regions under this share of the image are fragments, in no bucket (350 pixels of 512 x 683)


def region_sums(values: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per ground-truth region of an HxW ``label``: class, pixels, share of the image, and the sums of (L, H, W)
    ``values`` and of their squares over its pixels ((L, regions) each)."""
    regions, area, classes = label_regions(label)
    inside = regions >= 0
    index, flat = regions[inside], values[:, inside].astype(np.float64)
    sums = np.stack([np.bincount(index, weights=v, minlength=area.size) for v in flat])
    squares = np.stack([np.bincount(index, weights=v * v, minlength=area.size) for v in flat])
    return classes, area, area / label.size, sums, squares


def dilation_table(classes: np.ndarray, pixels: np.ndarray, share: np.ndarray, sums: np.ndarray, squares: np.ndarray,
                   stuff: Sequence[int]) -> dict[str, Any]:
    """Mean and standard deviation over pixels, per layer, of the regions (4-connected regions of one class: touching
    objects of a class are one region, an occluded object may be two) of thing classes in thirds by area (small,
    medium, large: a third of those regions each, by share of the image), of stuff classes, of the fragments (regions
    under :data:`FRAGMENT` of the image, in neither), of all, and per class."""
    thing, kept = ~np.isin(classes, stuff), share >= FRAGMENT
    cuts = np.quantile(share[thing & kept], [1 / 3, 2 / 3]) if (thing & kept).any() else np.full(2, np.inf)
    bucket = np.where(thing, np.digitize(share, cuts, right=True), len(DILATION_BUCKETS) - 1)

    def summary(mask: np.ndarray) -> dict[str, Any]:
        n = pixels[mask].sum()
        mean = sums[:, mask].sum(1) / max(n, 1)
        std = np.sqrt(np.maximum(squares[:, mask].sum(1) / max(n, 1) - mean**2, 0))
        return {"pixels": int(n), "regions": int(mask.sum()), "mean": mean.tolist(), "std": std.tolist()}

    return {"thirds": cuts.tolist(), "fragment_share": FRAGMENT, "all": summary(np.ones_like(thing)),
            "buckets": {name: summary((bucket == i) & kept) for i, name in enumerate(DILATION_BUCKETS)},
            "fragments": summary(~kept), "classes": {int(c): summary(classes == c) for c in np.unique(classes)}}
