"""Per-image segmentation counts, and the statistics that say whether a difference in mIoU is real.

Where the methods come from:

- **Per-image counts.** The dataset metric (``ConfusionMatrix`` in engine/metric.py: torchvision's reference, mmseg's
  rule that classes absent from ground truth and prediction are left out) is a ratio of sums over images: a class's
  intersection I, union U = gt + pred - I and ground truth are additive over images. Per-image counts therefore
  reproduce the dataset mIoU/aAcc/mAcc exactly, and resampling images is resampling rows of an (images x classes)
  count matrix.
- **Paired bootstrap over test images** (Efron & Tibshirani 1993, percentile interval; paired resampling of one test
  set to compare two systems as in Koehn 2004, "Statistical significance tests for machine translation
  evaluation"). Both runs are scored on the same resampled images, so image difficulty cancels. A resample is a row
  of multinomial counts (how often each image was drawn); all resamples are one matrix product with the counts.
- **Object sizes.** 4-connected components of each class in the ground truth, bucketed with COCO's area ranges
  (small < 32^2, medium < 96^2, large otherwise; Lin et al. 2014, cocodataset.org detection evaluation) scaled by
  the image's area relative to a 640x480 COCO image, see :func:`size_thresholds`. Components are class regions,
  not instances: touching objects of one class merge, an occluded object may split.
- **Training randomness.** Welch's (1947) t interval for the difference of the mean mIoU over seeds, with the
  Welch-Satterthwaite degrees of freedom; Student t quantiles from the regularised incomplete beta function
  (Numerical Recipes, 3rd ed., section 6.4). The optional two-level bootstrap (seeds within each variant, then
  images; Davison & Hinkley 1997, section 3.8; Bouthillier et al. 2021, "Accounting for variance in machine learning
  benchmarks") mixes both sources; with 2-3 seeds per variant it understates the seed part (few distinct draws).

Percentages throughout, like ``ConfusionMatrix.metrics``; undefined values (no union, no resample) are None in the
returned dicts, so they serialise to JSON as they are.
"""

from __future__ import annotations

import math
import statistics as pystats
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from data import IGNORE_INDEX

SIZE_BUCKETS = ("small", "medium", "large")
SIZE_FIELDS = ("correct", "pixels", "components")
COCO_SMALL_AREA, COCO_LARGE_AREA, COCO_IMAGE_AREA = 32**2, 96**2, 640 * 480
THIRDS = ("frequent", "medium", "rare")
_BLOCK = 100  # resamples drawn per block: fixes the random stream, so a seed gives the same resamples at any size
_FORMAT = 1

__all__ = [
    "SIZE_BUCKETS",
    "SIZE_FIELDS",
    "THIRDS",
    "ImageCounts",
    "PerImageCounts",
    "compare_variants",
    "frequency_thirds",
    "image_counts",
    "label_components",
    "paired_bootstrap",
    "size_counts",
    "size_thresholds",
    "t_quantile",
    "welch_interval",
]


# ------------------------------------------------------------------------------------------- per-image counts
class ImageCounts(NamedTuple):
    """Counts of one image for the classes with a non-empty union (int64 arrays of equal length, classes ascending)."""

    classes: np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    gt: np.ndarray


def image_counts(
    pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> ImageCounts:
    """Per-class intersection, union and ground-truth pixels of one image, counted with bincount where pred lives.

    A tensor on a GPU is counted there with torch (three C-sized results are copied back); CPU tensors and arrays
    with numpy, which on CPU is faster than torch's bincount and independent of torch's thread pool.

    Args:
        pred: predicted class indices, any shape.
        label: ground truth of the same shape; pixels equal to ``ignore_index`` count in nothing.
        num_classes: number of classes C; labels and predictions on labelled pixels must lie in 0..C-1.
        ignore_index: the ignore label (255).

    Returns:
        ImageCounts holding only the classes whose union is non-zero.

    Raises:
        ValueError: on a shape mismatch or values outside 0..C-1.
    """
    if isinstance(pred, torch.Tensor) and pred.device.type != "cpu":
        counts = _counts_torch(pred, torch.as_tensor(label), num_classes, ignore_index)
    else:  # numpy's bincount: on CPU it is faster than torch's and does not depend on torch's thread pool
        counts = _counts_numpy(_numpy(pred), _numpy(label), num_classes, ignore_index)
    classes = np.flatnonzero(counts[1] > 0)
    return ImageCounts(classes.astype(np.int64), counts[0, classes], counts[1, classes], counts[2, classes])


def _range_error(num_classes: int, ignore_index: int) -> ValueError:
    return ValueError(f"labels or predictions outside 0..{num_classes - 1} (other than the ignore index {ignore_index})")


def _counts_torch(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    """(3, C) int64 (intersection, union, gt), counted on pred's device."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    pred = pred.reshape(-1).long()
    label = label.to(pred.device).reshape(-1).long()
    valid = label != ignore_index
    t, p = label[valid], pred[valid]
    if t.numel() and bool(torch.minimum(t.min(), p.min()) < 0):
        raise _range_error(num_classes, ignore_index)
    gt = torch.bincount(t, minlength=num_classes)
    predicted = torch.bincount(p, minlength=num_classes)
    inter = torch.bincount(t[t == p], minlength=num_classes)
    if gt.numel() != num_classes or predicted.numel() != num_classes:
        raise _range_error(num_classes, ignore_index)
    return torch.stack([inter, gt + predicted - inter, gt]).cpu().numpy()


def _counts_numpy(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(3, C) int64 (intersection, union, gt) with numpy."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    pred, label = pred.reshape(-1), label.reshape(-1)
    valid = label != ignore_index
    t, p = label[valid].astype(np.int64), pred[valid].astype(np.int64)
    if t.size and min(t.min(), p.min()) < 0:
        raise _range_error(num_classes, ignore_index)
    gt = np.bincount(t, minlength=num_classes)
    predicted = np.bincount(p, minlength=num_classes)
    inter = np.bincount(t[t == p], minlength=num_classes)
    if gt.size != num_classes or predicted.size != num_classes:
        raise _range_error(num_classes, ignore_index)
    return np.stack([inter, gt + predicted - inter, gt]).astype(np.int64)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class PerImageCounts:
    """Counts of N images: names, per-class (intersection, union, gt) in a CSR layout, optional size buckets.

    Image i owns entries ``offsets[i]:offsets[i+1]`` of ``classes``/``intersection``/``union``/``gt``. ``sizes``,
    when recorded, is (N, 3, 3) int64: rows :data:`SIZE_BUCKETS`, columns :data:`SIZE_FIELDS`.

    Args:
        num_classes: number of classes C.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.names: list[str] = []
        self._seen: set[str] = set()
        self._parts: list[ImageCounts] = []
        self._sizes: list[np.ndarray] = []
        self._packed: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"PerImageCounts({len(self)} images, {self.num_classes} classes, sizes={self.has_sizes})"

    @property
    def has_sizes(self) -> bool:
        """Whether size-bucket counts were recorded (for every image, or for none)."""
        return bool(self._sizes)

    def append(self, name: str, counts: ImageCounts, sizes: np.ndarray | None = None) -> None:
        """Add one image.

        Args:
            name: unique image name (e.g. the file stem).
            counts: the image's :func:`image_counts`.
            sizes: its :func:`size_counts` (3x3); give it for every image or for none.

        Raises:
            ValueError: on a repeated name, class ids outside 0..C-1, or sizes given for some images only.
        """
        name = str(name)
        if name in self._seen:
            raise ValueError(f"image {name!r} is already in these counts; names must be unique")
        classes = np.asarray(counts.classes, dtype=np.int64)
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"class ids of image {name!r} lie outside 0..{self.num_classes - 1}")
        if (sizes is not None) != self.has_sizes and self.names:
            raise ValueError(f"size counts must be given for every image or for none (image {name!r})")
        if sizes is not None:
            sizes = np.asarray(sizes, dtype=np.int64)
            if sizes.shape != (len(SIZE_BUCKETS), len(SIZE_FIELDS)):
                raise ValueError(f"size counts of image {name!r} have shape {sizes.shape}, expected (3, 3)")
            self._sizes.append(sizes)
        self._parts.append(ImageCounts(classes, *(np.asarray(a, dtype=np.int64) for a in counts[1:])))
        self.names.append(name)
        self._seen.add(name)
        self._packed = None

    def add(
        self, name: str, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, sizes: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        """Count one image's prediction against its label (2-D, same shape) and append it.

        Args:
            name: unique image name.
            pred: HxW predicted classes (tensor on any device, or array).
            label: HxW ground truth, ``ignore_index`` for unlabelled pixels.
            sizes: also record the size buckets (CPU work, about 10 ms for a 512x683 map).
            ignore_index: the ignore label.
        """
        counts = image_counts(pred, label, self.num_classes, ignore_index)
        self.append(name, counts, size_counts(pred, label, ignore_index=ignore_index) if sizes else None)

    def _pack(self) -> tuple[np.ndarray, ...]:
        """(offsets, classes, intersection, union, gt) as contiguous arrays."""
        if self._packed is None:
            lengths = np.array([len(p.classes) for p in self._parts], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            cat = [np.concatenate([p[k] for p in self._parts]) if self._parts else np.zeros(0, np.int64)
                   for k in range(4)]
            self._packed = (offsets, *cat)
        return self._packed

    def dense(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The counts as (N, C) int64 arrays: (intersection, union, gt)."""
        offsets, classes, inter, union, gt = self._pack()
        rows = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(offsets))
        out = tuple(np.zeros((len(self), self.num_classes), dtype=np.int64) for _ in range(3))
        for array, values in zip(out, (inter, union, gt)):
            array[rows, classes] = values
        return out  # type: ignore[return-value]

    def sizes(self) -> np.ndarray:
        """Size-bucket counts, (N, 3, 3) int64 (bucket x (correct, pixels, components)); ValueError if not recorded."""
        if not self.has_sizes:
            raise ValueError("these counts hold no size buckets (recorded with sizes=False)")
        return np.stack(self._sizes)

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dataset totals per class, (C,) int64 each: (intersection, union, gt)."""
        _, classes, inter, union, gt = self._pack()
        return tuple(_sum_by(classes, v, self.num_classes) for v in (inter, union, gt))  # type: ignore[return-value]

    def metrics(self) -> dict[str, Any]:
        """``mIoU``, ``aAcc``, ``mAcc``, ``score``, per-class ``iou`` and ``acc``, in percent.

        Identical to ``ConfusionMatrix.metrics()`` (engine/metric.py) over the same images: the same integer totals and the
        same float operations in the same order.
        """
        inter, union, gt = (v.astype(np.float64) for v in self.totals())
        iou = [100.0 * float(c / u) if u > 0 else None for c, u in zip(inter, union)]
        acc = [100.0 * float(c / g) if g > 0 else None for c, g in zip(inter, gt)]
        total = float(gt.sum())
        a_acc = 100.0 * float(inter.sum()) / total if total > 0 else math.nan
        m_iou = _mean(iou)
        return {"mIoU": m_iou, "aAcc": a_acc, "mAcc": _mean(acc), "score": (a_acc + m_iou) / 2, "iou": iou, "acc": acc}

    def subset(self, indices: Sequence[int] | np.ndarray) -> PerImageCounts:
        """A new object holding images ``indices`` in that order."""
        out = PerImageCounts(self.num_classes)
        for i in np.asarray(indices, dtype=np.int64):
            out.append(self.names[i], self._parts[i], self._sizes[i] if self.has_sizes else None)
        return out

    def sorted(self) -> PerImageCounts:
        """A new object with the images sorted by name (a canonical order, e.g. after gathering ranks)."""
        return self.subset(sorted(range(len(self)), key=self.names.__getitem__))

    @classmethod
    def concatenate(cls, parts: Sequence[PerImageCounts]) -> PerImageCounts:
        """Join objects (e.g. one per process from ``dist.all_gather_object``); names must stay unique."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({p.num_classes for p in parts}) != 1:
            raise ValueError(f"parts count different numbers of classes: {sorted({p.num_classes for p in parts})}")
        out = cls(parts[0].num_classes)
        for part in parts:
            for i, name in enumerate(part.names):
                out.append(name, part._parts[i], part._sizes[i] if part.has_sizes else None)
        return out

    @classmethod
    def from_dense(
        cls, names: Sequence[str], intersection: np.ndarray, union: np.ndarray, gt: np.ndarray,
        sizes: np.ndarray | None = None,
    ) -> PerImageCounts:
        """Build from (N, C) count arrays (synthetic data, tests); checks 0 <= I <= gt <= U and I <= U."""
        inter, union, gt = (np.asarray(a, dtype=np.int64) for a in (intersection, union, gt))
        if not (inter.shape == union.shape == gt.shape and inter.ndim == 2 and len(names) == inter.shape[0]):
            raise ValueError("intersection, union and gt must be (N, C) arrays with N = len(names)")
        if (inter < 0).any() or (inter > gt).any() or (gt > union).any():
            raise ValueError("counts must satisfy 0 <= intersection <= gt <= union")
        out = cls(inter.shape[1])
        for i, name in enumerate(names):
            keep = np.flatnonzero(union[i] > 0)
            out.append(name, ImageCounts(keep, inter[i, keep], union[i, keep], gt[i, keep]),
                       None if sizes is None else sizes[i])
        return out

    def save(self, path: str | Path) -> None:
        """Write a compressed .npz (no pickles); about 0.5 MB for 2,000 images with ~20 classes each."""
        offsets, classes, inter, union, gt = self._pack()
        arrays = {
            "format": np.int64(_FORMAT), "num_classes": np.int64(self.num_classes),
            "names": np.array(self.names, dtype=str), "offsets": offsets, "classes": classes.astype(np.int16),
            "intersection": inter, "union": union, "gt": gt,
        }
        if self.has_sizes:
            arrays["sizes"] = self.sizes()
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path lacking it
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> PerImageCounts:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or int(z["format"]) != _FORMAT:
                raise ValueError(f"{path} is not a per-image counts file of format {_FORMAT}")
            out = cls(int(z["num_classes"]))
            offsets, classes = z["offsets"], z["classes"].astype(np.int64)
            inter, union, gt = z["intersection"], z["union"], z["gt"]
            sizes = z.get("sizes")
            for i, name in enumerate(z["names"].tolist()):
                s = slice(offsets[i], offsets[i + 1])
                out.append(name, ImageCounts(classes[s], inter[s], union[s], gt[s]), None if sizes is None else sizes[i])
        return out


def _sum_by(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Integer sums of ``values`` per ``index`` (exact, unlike a float-weighted bincount)."""
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, index, values)
    return out


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


# ------------------------------------------------------------------------------------------- object sizes
def size_thresholds(
    height: int, width: int, small: float = COCO_SMALL_AREA, large: float = COCO_LARGE_AREA,
    reference_area: float = COCO_IMAGE_AREA,
) -> tuple[float, float]:
    """COCO's area thresholds scaled to an image: (small_max, large_min) in pixels.

    COCO's 32^2 and 96^2 hold for ~640x480 images; an ADE20K image is scored at its own size and shown to the model
    resized, so what matters is the object's share of the image: the thresholds are scaled by
    ``height * width / (640 * 480)`` (small < 0.33 % of the image, large >= 3 %). A component is small if its area
    is < small_max, large if >= large_min, medium otherwise.
    """
    factor = height * width / reference_area
    return small * factor, large * factor


def _row_runs(label: np.ndarray, ignore_index: int) -> tuple[np.ndarray, ...]:
    """Runs of equal values along rows, and the vertical 4-neighbour links between runs of one (non-ignored) class.

    Returns (starts, lengths, values, run_of_pixel, link_a, link_b): flat start index, length and value per run,
    the run index of every pixel, and pairs of linked runs.
    """
    width = label.shape[1]
    flat = label.reshape(-1)
    start = np.empty(flat.size, dtype=bool)
    start[0] = True
    np.not_equal(flat[1:], flat[:-1], out=start[1:])
    start[::width] = True
    starts = np.flatnonzero(start)
    lengths = np.diff(np.append(starts, flat.size))
    run_of_pixel = np.cumsum(start, dtype=np.int64) - 1
    # Two overlapping runs of adjacent rows overlap from a column where one of them starts, so the links are
    # found at run starts only: pixel p (row y) and p + width (row y+1), same class, one of them a run start.
    link = start[:-width] | start[width:]
    link &= flat[:-width] == flat[width:]
    link &= flat[:-width] != ignore_index
    p = np.flatnonzero(link)
    return starts, lengths, flat[starts], run_of_pixel, run_of_pixel[p], run_of_pixel[p + width]


def _link_roots(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over n nodes and links (a, b), vectorised: every root hooks onto the smallest root it links to,
    then pointers are jumped to the roots; repeated until the links join no two trees. Each node's root is the
    smallest node of its component."""
    parent = np.arange(n, dtype=np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def _components(label: np.ndarray, ignore_index: int) -> tuple[np.ndarray, ...]:
    """Run decomposition plus the component of each labelled run (raster order of first pixel; -1 for ignored)."""
    starts, lengths, values, run_of_pixel, a, b = _row_runs(label, ignore_index)
    roots = _link_roots(starts.size, a, b)
    valid = values != ignore_index
    is_root = (roots == np.arange(starts.size)) & valid
    ids = np.cumsum(is_root) - 1
    component = np.where(valid, ids[roots], -1)
    return starts, lengths, component, run_of_pixel, int(is_root.sum())


def label_components(label: np.ndarray | torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, int]:
    """4-connected components of each class of a label map (run-length rows + union-find over runs).

    Args:
        label: HxW class map.
        ignore_index: pixels with this value belong to no component.

    Returns:
        (components, count): HxW int64 component ids 0..count-1, numbered in raster order of their first pixel
        (as a raster-scan flood fill numbers them), -1 on ignored pixels; and the number of components.
    """
    label = _numpy_2d(label)
    if label.size == 0:
        return np.full(label.shape, -1, dtype=np.int64), 0
    _, _, component, run_of_pixel, count = _components(label, ignore_index)
    return component[run_of_pixel].reshape(label.shape), count


def size_counts(
    pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX,
    thresholds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Correctly predicted and ground-truth pixels of the ground-truth components in each size bucket.

    Args:
        pred: HxW predicted classes (tensor on any device, or array).
        label: HxW ground truth; ``ignore_index`` pixels belong to no component.
        ignore_index: the ignore label.
        thresholds: (small_max, large_min) in pixels; default :func:`size_thresholds` of the image.

    Returns:
        (3, 3) int64: rows small/medium/large, columns (correct pixels, ground-truth pixels, components). Recall per
        bucket = sum of correct / sum of pixels over images, so it is additive and bootstrappable.
    """
    if isinstance(pred, torch.Tensor) and pred.device.type != "cpu":  # compare on the device, copy booleans
        if pred.shape != torch.as_tensor(label).shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
        correct = (pred == torch.as_tensor(label).to(pred.device)).cpu().numpy()
        label = _numpy_2d(label)
    else:
        label = _numpy_2d(label)
        pred = _numpy(pred)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
        correct = pred == label
    out = np.zeros((len(SIZE_BUCKETS), len(SIZE_FIELDS)), dtype=np.int64)
    if label.size == 0:
        return out
    starts, lengths, component, _, count = _components(label, ignore_index)
    cumulative = np.concatenate([[0], np.cumsum(correct.reshape(-1), dtype=np.int64)])
    run_correct = cumulative[starts + lengths] - cumulative[starts]
    valid = component >= 0
    comp = component[valid]
    area = _sum_by(comp, lengths[valid], count)
    comp_correct = _sum_by(comp, run_correct[valid], count)
    small_max, large_min = thresholds if thresholds is not None else size_thresholds(*label.shape)
    bucket = np.where(area < small_max, 0, np.where(area < large_min, 1, 2))
    out[:, 0] = _sum_by(bucket, comp_correct, 3)
    out[:, 1] = _sum_by(bucket, area, 3)
    out[:, 2] = np.bincount(bucket, minlength=3)
    return out


def _numpy_2d(label: np.ndarray | torch.Tensor) -> np.ndarray:
    array = _numpy(label)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D label map, got shape {array.shape}")
    return np.ascontiguousarray(array)


# ------------------------------------------------------------------------------------------- bootstrap
def _runs_array(x: np.ndarray, what: str) -> np.ndarray:
    """(N, K) or (S, N, K) -> (S, N, K) float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{what} must be an (images, columns) or (runs, images, columns) array, got shape {x.shape}")
    return x


def _weights(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """(rows, n) multinomial counts: how often each of n items is drawn in n draws with replacement."""
    idx = rng.integers(0, n, size=(rows, n))
    idx += (np.arange(rows, dtype=np.int64) * n)[:, None]
    return np.bincount(idx.reshape(-1), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _ratios(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 * num / den, NaN where den == 0."""
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out * 100.0


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over non-NaN entries along ``axis``; NaN where there are none (no warning)."""
    ok = ~np.isnan(x)
    count = ok.sum(axis)
    total = np.where(ok, x, 0.0).sum(axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def _percentiles(x: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0, ignoring NaN; NaN where no value is defined."""
    q = 100.0 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])
    out = np.full((2,) + x.shape[1:], np.nan)
    defined = ~np.isnan(x).all(0)
    if defined.any():
        flat = x.reshape(x.shape[0], -1)[:, defined.reshape(-1)]
        out.reshape(2, -1)[:, defined.reshape(-1)] = np.nanpercentile(flat, q, axis=0)
    return out[0], out[1]


def _num(x: float | np.floating) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _excludes_zero(low: float | None, high: float | None) -> bool:
    return low is not None and high is not None and (low > 0 or high < 0)


def _interval(diff: float, low: float, high: float, **extra: Any) -> dict[str, Any]:
    d, lo, hi = _num(diff), _num(low), _num(high)
    return {"diff": d, "low": lo, "high": hi, "excludes_zero": _excludes_zero(lo, hi), **extra}


def paired_bootstrap(
    num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, *,
    groups: Mapping[str, Sequence[int] | np.ndarray] | None = None, resamples: int = 1000, seed: int = 0,
    confidence: float = 0.95, two_level: bool = False,
) -> dict[str, Any]:
    """Paired bootstrap over images of ratios ``sum(num) / sum(den)`` per column, and of their means over columns.

    A column is any additive pair: (intersection, union) per class gives IoU and mIoU; (correct, pixels) per size
    bucket gives recall. Each resample draws N images with replacement (the same draw for every run), sums the
    counts, and recomputes every ratio; a column with den == 0 in a resample is undefined there and left out of
    that resample's means, as the metric leaves absent classes out. With several runs per variant (seeds, shape
    (S, N, K)), a variant's value is the average of its runs' values, so the image-sampling interval is for the
    difference of seed-averaged metrics (average of per-seed mIoUs, not the mIoU of pooled counts).

    Args:
        num_a, den_a: variant a's numerators and denominators, (N, K) or (S_a, N, K), non-negative integers.
        num_b, den_b: variant b's, (N, K) or (S_b, N, K), same N and K, same images in the same order.
        groups: named column subsets whose mean ratio is also bootstrapped (default ``{"mean": all columns}``).
        resamples: number of resamples (>= 1; use >= 1000 for 95 % intervals).
        seed: seed of the numpy Generator; a seed gives the same image draws for any K, any runs, and the first R
            resamples of a larger count are those of R.
        confidence: two-sided level of the percentile intervals.
        two_level: also resample runs within each variant (with replacement) for every image resample; needs >= 2
            runs per variant.

    Returns:
        ``{"images", "resamples", "seed", "confidence", "runs": [S_a, S_b], "columns": {"a", "b", "diff", "low",
        "high", "defined"} (lists of K; defined = share of resamples where both sides have den > 0), "groups": {name:
        {"a", "b", "diff", "low", "high", "excludes_zero", "columns", "two_level": {...} or None}}}``, ratios in
        percent, diff = b - a on the full set, None where undefined.

    Raises:
        ValueError: on mismatched shapes or bad arguments.
    """
    na, da, nb, db = (_runs_array(x, w) for x, w in ((num_a, "num_a"), (den_a, "den_a"), (num_b, "num_b"),
                                                        (den_b, "den_b")))
    if na.shape != da.shape or nb.shape != db.shape or na.shape[1:] != nb.shape[1:]:
        raise ValueError(f"shapes differ: num_a {na.shape}, den_a {da.shape}, num_b {nb.shape}, den_b {db.shape}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    sa, n, k = na.shape
    sb = nb.shape[0]
    if n == 0:
        raise ValueError("no images to resample")
    if two_level and min(sa, sb) < 2:
        raise ValueError(f"the two-level bootstrap needs >= 2 runs per variant, got {sa} and {sb}")
    groups = {"mean": np.arange(k)} if groups is None else {g: np.asarray(c, dtype=np.int64) for g, c in groups.items()}
    # One (N, M) matrix, columns [num_a runs..., den_a runs..., num_b runs..., den_b runs...]: each resample's sums
    # are one row of weights @ matrix. Sums of integer counts stay exact in float64 (< 2^53).
    matrix = np.concatenate([x.transpose(1, 0, 2).reshape(n, -1) for x in (na, da, nb, db)], axis=1)

    def evaluate(sums: np.ndarray) -> tuple[np.ndarray, ...]:
        """(rows, M) sums -> per-run ratios (rows, S, K) of a and b, per-run group means (rows, S, G)."""
        rows = sums.shape[0]
        parts = np.split(sums, np.cumsum([sa * k, sa * k, sb * k])[:3], axis=1)
        ra = _ratios(parts[0].reshape(rows, sa, k), parts[1].reshape(rows, sa, k))
        rb = _ratios(parts[2].reshape(rows, sb, k), parts[3].reshape(rows, sb, k))
        ga = np.stack([_nanmean(ra[..., c], -1) for c in groups.values()], -1)
        gb = np.stack([_nanmean(rb[..., c], -1) for c in groups.values()], -1)
        return ra, rb, ga, gb

    point_ra, point_rb, point_ga, point_gb = evaluate(matrix.sum(0, keepdims=True))
    rng = np.random.default_rng(seed)
    col_diff, col_defined, grp_a, grp_b = [], [], [], []
    for begin in range(0, resamples, _BLOCK):
        sums = _weights(rng, n, min(_BLOCK, resamples - begin)) @ matrix
        ra, rb, ga, gb = evaluate(sums)
        col_diff.append(_nanmean(rb, 1) - _nanmean(ra, 1))
        col_defined.append(~np.isnan(ra).all(1) & ~np.isnan(rb).all(1))
        grp_a.append(ga)
        grp_b.append(gb)
    col_diff_all = np.concatenate(col_diff)
    ga_all, gb_all = np.concatenate(grp_a), np.concatenate(grp_b)  # (R, S, G)
    grp_diff = _nanmean(gb_all, 1) - _nanmean(ga_all, 1)  # (R, G)
    col_low, col_high = _percentiles(col_diff_all, confidence)
    grp_low, grp_high = _percentiles(grp_diff, confidence)
    two_low = two_high = None
    if two_level:
        seed_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        pick_a = seed_rng.integers(0, sa, size=(resamples, sa))
        pick_b = seed_rng.integers(0, sb, size=(resamples, sb))
        rows = np.arange(resamples)[:, None]
        two = _nanmean(gb_all[rows, pick_b], 1) - _nanmean(ga_all[rows, pick_a], 1)
        two_low, two_high = _percentiles(two, confidence)
    a_cols, b_cols = _nanmean(point_ra[0], 0), _nanmean(point_rb[0], 0)
    a_grp, b_grp = _nanmean(point_ga[0], 0), _nanmean(point_gb[0], 0)
    return {
        "images": n, "resamples": resamples, "seed": seed, "confidence": confidence, "runs": [sa, sb],
        "columns": {
            "a": [_num(v) for v in a_cols], "b": [_num(v) for v in b_cols],
            "diff": [_num(v) for v in b_cols - a_cols],
            "low": [_num(v) for v in col_low], "high": [_num(v) for v in col_high],
            "defined": [float(v) for v in np.concatenate(col_defined).mean(0)],
        },
        "groups": {
            name: {
                "a": _num(a_grp[g]), "b": _num(b_grp[g]),
                **_interval(b_grp[g] - a_grp[g], grp_low[g], grp_high[g]), "columns": int(groups[name].size),
                "two_level": None if two_low is None else _interval(b_grp[g] - a_grp[g], two_low[g], two_high[g]),
            }
            for g, name in enumerate(groups)
        },
    }


def frequency_thirds(gt_pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Split the classes with ground truth into frequent / medium / rare thirds by their ground-truth pixel count.

    Args:
        gt_pixels: (C,) ground-truth pixels per class over the evaluation set.

    Returns:
        ``{"frequent": ids, "medium": ids, "rare": ids}`` (int64 arrays, most frequent first; sizes differ by at most
        one, the larger thirds first; ties broken by class id). Classes without ground truth are in none.
    """
    gt_pixels = np.asarray(gt_pixels)
    ids = np.flatnonzero(gt_pixels > 0)
    order = ids[np.lexsort((ids, -gt_pixels[ids]))]
    return dict(zip(THIRDS, (part.astype(np.int64) for part in np.array_split(order, 3))))


# ------------------------------------------------------------------------------------------- training randomness
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution with ``df`` (> 0, may be fractional or inf) degrees of freedom."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if math.isinf(df) or df > 1e7:
        return pystats.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    high = 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    low = 0.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any] | None:
    """Welch t interval for mean(b) - mean(a): the spread from training randomness (seeds) on a fixed test set.

    Args:
        a, b: one metric value per seed of each variant.
        confidence: two-sided level.

    Returns:
        ``{"diff", "low", "high", "excludes_zero", "se", "df", "n_a", "n_b"}``, or None when a side has < 2 values.
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = pystats.variance(a) / len(a), pystats.variance(b) / len(b)
    se = math.sqrt(va + vb)
    diff = pystats.fmean(b) - pystats.fmean(a)
    if se == 0:
        df, half = float(len(a) + len(b) - 2), 0.0
    else:
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        half = t_quantile(0.5 + confidence / 2, df) * se
    return _interval(diff, diff - half, diff + half, se=se, df=df, n_a=len(a), n_b=len(b))


# ------------------------------------------------------------------------------------------- comparison
def _as_list(runs: PerImageCounts | Sequence[PerImageCounts]) -> list[PerImageCounts]:
    runs = [runs] if isinstance(runs, PerImageCounts) else list(runs)
    if not runs:
        raise ValueError("each variant needs at least one run")
    return runs


def _check_paired(runs: list[PerImageCounts], labels: Sequence[str]) -> None:
    """Same classes, same image names in the same order, same ground truth; ValueError naming the first problem."""
    ref = runs[0]
    for run, label in zip(runs, labels):
        if run.num_classes != ref.num_classes:
            raise ValueError(f"{label} counts {run.num_classes} classes, {labels[0]} counts {ref.num_classes}")
        if run.names != ref.names:
            if sorted(run.names) == sorted(ref.names):
                raise ValueError(f"{label} holds the same images as {labels[0]} in another order; call .sorted() "
                                 f"on both before comparing")
            missing = sorted(set(ref.names) ^ set(run.names))
            raise ValueError(f"{label} and {labels[0]} were not evaluated on the same images ({len(run)} vs "
                             f"{len(ref)}; {len(missing)} names in only one, e.g. {missing[:3]}); a paired comparison "
                             f"needs the same images")
    gt = ref.dense()[2]
    for run, label in zip(runs[1:], labels[1:]):
        if not np.array_equal(run.dense()[2], gt):
            raise ValueError(f"{label} and {labels[0]} have different ground-truth counts on the same images "
                             f"(different labels or label processing); they cannot be paired")


def _fmt(x: float | None, sign: str = "+") -> str:
    return "n/a" if x is None else f"{x:{sign}.2f}"


def compare_variants(
    a: PerImageCounts | Sequence[PerImageCounts], b: PerImageCounts | Sequence[PerImageCounts], *,
    labels: tuple[str, str] = ("a", "b"), class_names: Sequence[str] | None = None, resamples: int = 1000,
    seed: int = 0, confidence: float = 0.95, two_level: bool = True,
) -> dict[str, Any]:
    """Compare variant b with variant a (one run or several seeds each) on the same validation images.

    Two questions, two intervals for the mIoU difference (b - a):

    - test-set sampling: paired bootstrap over images (all runs resampled with the same images); with several seeds
      the statistic is the difference of seed-averaged mIoUs. Would the difference hold on other images like these?
    - training randomness: Welch t interval over the per-seed mIoUs (None with < 2 seeds on a side). Would it hold
      for other training seeds, on this test set?

    plus, with >= 2 seeds per side and ``two_level``, a two-level bootstrap (seeds, then images) for both at once.
    Per-class IoU differences, the frequency thirds and (if both sides recorded them) size-bucket recalls get
    image-sampling intervals from the same resamples.

    Args:
        a, b: the runs (PerImageCounts, or a list of them for seeds) of the reference and the variant.
        labels: names of a and b for the verdict.
        class_names: C names for the per-class entries (default "class <id>").
        resamples, seed, confidence: as in :func:`paired_bootstrap`.
        two_level: add the two-level bootstrap where both sides have >= 2 runs.

    Returns:
        ``{"labels", "images", "runs": [S_a, S_b], "miou": {"a": [per-seed mIoU], "b": [...]}, "test_sampling":
        {"a", "b", "diff", "low", "high", "excludes_zero", "question", "method"}, "training_randomness": {...} or
        None, "two_level": {...} or None, "thirds": {third: {"a", "b", "diff", "low", "high", "excludes_zero",
        "classes"}}, "per_class": [{"class", "name", "a", "b", "diff", "low", "high", "defined"}], "sizes": {bucket:
        {"a", "b", "diff", "low", "high", "excludes_zero", "components"}} or None, "verdict": str}``.

    Raises:
        ValueError: if the runs were not evaluated on the same images (names and order) and labels.
    """
    runs_a, runs_b = _as_list(a), _as_list(b)
    run_labels = [f"{labels[0]}[{i}]" for i in range(len(runs_a))] + [f"{labels[1]}[{i}]" for i in range(len(runs_b))]
    _check_paired(runs_a + runs_b, run_labels)
    dense_a = [r.dense() for r in runs_a]
    dense_b = [r.dense() for r in runs_b]
    gt_total = dense_a[0][2].sum(0)
    thirds = frequency_thirds(gt_total)
    groups = {"all": np.arange(runs_a[0].num_classes), **thirds}
    boot = paired_bootstrap(
        np.stack([d[0] for d in dense_a]), np.stack([d[1] for d in dense_a]),
        np.stack([d[0] for d in dense_b]), np.stack([d[1] for d in dense_b]),
        groups=groups, resamples=resamples, seed=seed, confidence=confidence,
        two_level=two_level and min(len(runs_a), len(runs_b)) >= 2,
    )
    miou_a = [r.metrics()["mIoU"] for r in runs_a]
    miou_b = [r.metrics()["mIoU"] for r in runs_b]
    pct = f"{100 * confidence:g}%"
    everything = boot["groups"]["all"]
    method = f"paired bootstrap over {boot['images']} images, {resamples} resamples, {pct} percentile interval"
    test = {k: everything[k] for k in ("a", "b", "diff", "low", "high", "excludes_zero")}
    test.update(question="test-set sampling", method=method)
    training = welch_interval(miou_a, miou_b, confidence)
    if training is not None:
        training.update(question="training randomness",
                        method=f"Welch t over {len(miou_a)} vs {len(miou_b)} seeds, {pct} interval")
    two = everything["two_level"]
    if two is not None:
        two.update(question="test-set sampling and training randomness",
                   method=f"two-level bootstrap (seeds, then images), {resamples} resamples")
    cols = boot["columns"]
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(runs_a[0].num_classes)]
    per_class = [
        {"class": c, "name": names[c], **{key: cols[key][c] for key in ("a", "b", "diff", "low", "high", "defined")}}
        for c in range(runs_a[0].num_classes)
    ]
    third_out = {
        t: {**{k: boot["groups"][t][k] for k in ("a", "b", "diff", "low", "high", "excludes_zero")},
            "classes": thirds[t].tolist()}
        for t in THIRDS
    }
    sizes = None
    if all(r.has_sizes for r in runs_a + runs_b):
        sa, sb = np.stack([r.sizes() for r in runs_a]), np.stack([r.sizes() for r in runs_b])
        size_boot = paired_bootstrap(sa[..., 0], sa[..., 1], sb[..., 0], sb[..., 1], resamples=resamples, seed=seed,
                                     confidence=confidence)["columns"]
        sizes = {
            bucket: {**{k: size_boot[k][i] for k in ("a", "b", "diff", "low", "high")},
                     "excludes_zero": _excludes_zero(size_boot["low"][i], size_boot["high"][i]),
                     "components": int(sa[0, :, i, 2].sum())}
            for i, bucket in enumerate(SIZE_BUCKETS)
        }
    return {
        "labels": list(labels), "images": boot["images"], "runs": [len(runs_a), len(runs_b)],
        "miou": {"a": miou_a, "b": miou_b}, "test_sampling": test, "training_randomness": training,
        "two_level": two, "thirds": third_out, "per_class": per_class, "sizes": sizes,
        "verdict": _verdict(labels, test, training, two, len(runs_a), len(runs_b), pct),
    }


def _verdict(
    labels: Sequence[str], test: dict[str, Any], training: dict[str, Any] | None, two: dict[str, Any] | None,
    n_a: int, n_b: int, pct: str,
) -> str:
    """One line: the difference, each interval with the question it answers, and whether it excludes zero."""
    def part(iv: dict[str, Any], name: str) -> str:
        where = "excludes 0" if iv["excludes_zero"] else "includes 0"
        return f"{name}: {pct} CI [{_fmt(iv['low'])}, {_fmt(iv['high'])}] {where}"

    seeds = "" if n_a == n_b == 1 else f" (mean of {n_b} vs {n_a} seeds)"
    line = (f"{labels[1]} - {labels[0]}: mIoU {_fmt(test['b'], '')} - {_fmt(test['a'], '')} = {_fmt(test['diff'])}"
            f"{seeds}; "
            f"{part(test, 'test-set sampling')}")
    if training is None:
        line += f"; training randomness: not estimated ({n_b} vs {n_a} seeds, needs >= 2 each)"
    else:
        line += f"; {part(training, 'training randomness')}"
    if two is not None:
        line += f"; {part(two, 'both (two-level bootstrap)')}"
    return line
