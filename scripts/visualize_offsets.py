"""Draw where stacked deformable convolutions sample, as in Figs. 5 and 6 of the DCNv1 paper.

Dai et al., "Deformable Convolutional Networks" (ICCV 2017), Fig. 5 (the three levels of 3x3
sampling) and Fig. 6 (the 9^3 = 729 locations on images): for one output position of the last
deformable layer, its 9 sampling locations are
``p * stride - padding + dilation * tap + offset(p, tap)`` in that layer's input grid. Each of them
is followed back through the previous deformable layer, whose offset (and mask) field is
interpolated bilinearly at the fractional location, giving 9^2 locations for two layers and 9^3
for three. In the ResNet-50 FCN at output stride 8 the layers between the deformable convs are 1x1
convs, so a position carries over unchanged; strides between layers are handled through each
layer's cumulative stride. For DCNv2 (Zhu et al. 2019) each location is weighted by the product of
the modulation masks along its path. With several deformable groups the offsets and masks are
averaged over the groups. Each position's panel zooms to the region its locations occupy (on small
images, where they reach far beyond the image, it shows the image and the padding around it); the
overview marks these regions with numbered rectangles.

Example:
    python scripts/visualize_offsets.py --checkpoint runs/def-conv-v2/best.pt \\
        --image ADE_val_00000001.jpg --points 300,200 500,380 --out offsets.png

``offset_figure`` returns the figure as an RGB array; train.py logs it to TensorBoard.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from torch import nn  # noqa: E402

from configs import UserError  # noqa: E402
from models.segmentor import deformable_layers  # noqa: E402

DEFAULT_LAYERS = 3  # the three conv2 of layer4 in the default configs
MAX_LAYERS = 4  # 9^4 = 6561 locations per position; more is unreadable
DEFAULT_POINTS = 5  # with the overview, two full rows of three panels
OUTPUT_COLOUR = "#39ff14"  # the output position, as the green point of DCNv1 Fig. 5
V1_COLOUR = "#ff2a2a"
PADDING_COLOUR = "#e4e4e4"  # outside the image, where the convolutions read zeros
MAX_PADDING = 0.6  # views reach at most this many image sizes into the padding, so the image stays legible
ZOOM_MARGIN = 0.15  # a point panel shows its locations' bounding box grown by this part of its longer side
ZOOM_MIN = 0.25  # ... and at least this part of the image's shorter side, so tiny spreads are not blown up
# plasma without its darkest quarter, so weak locations stay visible on the dimmed photo
MASK_CMAP = ListedColormap(matplotlib.colormaps["plasma"](np.linspace(0.22, 1.0, 256)), name="plasma_light")


@dataclass
class LayerField:
    """The offset (and mask) field of one deformable layer on one image, with its geometry.

    ``offsets`` is (K, 2, H, W) over the layer's output grid, [:, 0] the y and [:, 1] the x offset of
    each tap (row-major over the kernel), in input-grid pixels; ``mask`` is (K, H, W) or None (v1);
    both are means over the deformable groups. ``magnitude`` (H, W) is the mean offset length over
    taps and groups.
    ``in_stride``/``out_stride``: network-input pixels per cell of the input/output grid.
    """

    name: str
    version: int
    groups: int
    offsets: np.ndarray
    mask: np.ndarray | None
    magnitude: np.ndarray
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_stride: float
    out_stride: float

    @property
    def out_size(self) -> tuple[int, int]:
        return self.offsets.shape[-2], self.offsets.shape[-1]


def _pow2_stride(net_size: tuple[int, int], size: tuple[int, int]) -> float:
    """The cumulative stride of a feature grid: the power of two nearest to the size ratio (long sides)."""
    ratio = max(net_size) / max(size)
    return float(2 ** round(np.log2(ratio)))


@torch.no_grad()
def run_with_fields(model: nn.Module, image_tensor: torch.Tensor) -> tuple[torch.Tensor | None, list[LayerField]]:
    """Run the model once in eval mode; return its logits (1, C, h', w') and every deformable layer's field.

    Layers come in the order the forward pass calls them; the model's train/eval mode is restored.
    """
    layers = deformable_layers(model)
    if not layers:
        raise UserError(
            "this checkpoint has no deformable layers (model.deform.version is 0), so there are no offsets to "
            "draw. Give a checkpoint of a def-conv-v1 or def-conv-v2 run."
        )
    x = image_tensor if image_tensor.dim() == 4 else image_tensor[None]
    device = next(model.parameters()).device
    x = x[:1].to(device=device, dtype=torch.float32)
    records: list[tuple[str, nn.Module, tuple[int, int], torch.Tensor, torch.Tensor | None]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, name: str) -> None:
        if all(r[0] != name for r in records):
            offsets, mask = module.offsets_and_mask(inputs[0])
            records.append((name, module, tuple(inputs[0].shape[-2:]), offsets, mask))

    handles = [
        layer.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)) for name, layer in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    logits = out.get("out") if isinstance(out, dict) else out if isinstance(out, torch.Tensor) else None
    net_size = tuple(x.shape[-2:])
    fields = []
    for name, module, in_size, offsets, mask in records:
        kh, kw = module.weight.shape[-2:]
        groups, taps = module.deform_groups, kh * kw
        h, w = offsets.shape[-2:]
        raw = offsets[0].double().cpu().reshape(groups, taps, 2, h, w)  # reshape: may be channels_last
        msk = None if mask is None else mask[0].double().cpu().reshape(groups, taps, h, w).mean(0).numpy()
        fields.append(
            LayerField(
                name=name, version=module.version, groups=groups, offsets=raw.mean(0).numpy(), mask=msk,
                magnitude=raw.norm(dim=2).mean((0, 1)).numpy(), kernel=(kh, kw),
                stride=tuple(module.stride), padding=tuple(module.padding), dilation=tuple(module.dilation),
                in_stride=_pow2_stride(net_size, in_size), out_stride=_pow2_stride(net_size, (h, w)),
            )
        )
    return logits, fields


def _bilinear(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample a (C, H, W) field at fractional (x, y) positions, clamped to the grid; returns (P, C)."""
    _, h, w = field.shape
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0 = np.clip(np.floor(x), 0, max(w - 2, 0)).astype(int)
    y0 = np.clip(np.floor(y), 0, max(h - 2, 0)).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx, wy = x - x0, y - y0
    value = (
        field[:, y0, x0] * (1 - wx) * (1 - wy)
        + field[:, y0, x1] * wx * (1 - wy)
        + field[:, y1, x0] * (1 - wx) * wy
        + field[:, y1, x1] * wx * wy
    )
    return value.T


def trace(fields: list[LayerField], point: tuple[float, float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Follow one output position of ``fields[-1]`` back through all of ``fields``.

    Args:
        fields: the stacked layers, shallowest first.
        point: (x, y) in the output grid of ``fields[-1]``; may be fractional.

    Returns:
        One (locations (9^j, 2) as (x, y), weights (9^j,)) per level j = 1..L, level j in the input grid
        of ``fields[-j]``. The 9 children of location i of level j are rows 9i..9i+8 of level j + 1, in
        row-major tap order. Weights are the products of the masks along the path (ones for v1).
    """
    pts = np.asarray([point], dtype=np.float64)
    weights = np.ones(1)
    levels = []
    for i in range(len(fields) - 1, -1, -1):
        f = fields[i]
        kh, kw = f.kernel
        taps = kh * kw
        n = len(pts)
        off = _bilinear(f.offsets.reshape(taps * 2, *f.out_size), pts[:, 0], pts[:, 1]).reshape(n, taps, 2)
        ky, kx = np.divmod(np.arange(taps), kw)
        x = pts[:, :1] * f.stride[1] - f.padding[1] + f.dilation[1] * kx + off[:, :, 1]
        y = pts[:, 1:] * f.stride[0] - f.padding[0] + f.dilation[0] * ky + off[:, :, 0]
        if f.mask is not None:
            weights = (weights[:, None] * _bilinear(f.mask, pts[:, 0], pts[:, 1])).reshape(-1)
        else:
            weights = np.repeat(weights, taps)
        locations = np.stack([x, y], axis=-1).reshape(-1, 2)
        levels.append((locations, weights))
        if i > 0:
            pts = locations * (f.in_stride / fields[i - 1].out_stride)
    return levels


def check_num_layers(num_layers: int | None, names: list[str]) -> int:
    """How many of the deformable layers ``names`` to trace (default: up to 3), or UserError for a bad count."""
    if num_layers is None:
        return min(DEFAULT_LAYERS, len(names))
    if not 1 <= num_layers <= min(MAX_LAYERS, len(names)):
        raise UserError(
            f"--layers {num_layers} is out of range: this model has {len(names)} deformable layer(s) "
            f"({', '.join(names)}) and at most {MAX_LAYERS} can be traced (9^{MAX_LAYERS} points). "
            f"Give a number from 1 to {min(MAX_LAYERS, len(names))}."
        )
    return num_layers


def _select_layers(fields: list[LayerField], num_layers: int | None) -> list[LayerField]:
    """The last ``num_layers`` deformable layers in forward order."""
    return fields[-check_num_layers(num_layers, [f.name for f in fields]) :]


def sampling_locations(
    model: nn.Module,
    image_tensor: torch.Tensor,
    points_feat: list[tuple[float, float]],
    num_layers: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sampling locations of the last ``num_layers`` stacked deformable layers for output positions.

    Args:
        model: a model with ``DeformConv2d`` layers (see ``models.segmentor.deformable_layers``).
        image_tensor: normalised image, (3, h, w) or (1, 3, h, w).
        points_feat: output positions (x, y) in the output grid of the last deformable layer.
        num_layers: how many layers to trace back from the last one (default: up to 3).

    Returns:
        Per point: (locations (9^L, 2) as (x, y) in the input grid of the first traced layer, weights
        (9^L,), the product of the v2 masks along each path, ones for v1).
    """
    _, fields = run_with_fields(model, image_tensor)
    fields = _select_layers(fields, num_layers)
    return [trace(fields, p)[-1] for p in points_feat]


# ------------------------------------------------------------------------------- choosing positions
def _interior_depth(mask: np.ndarray, max_iter: int = 12) -> np.ndarray:
    """How many 3x3 erosions each cell of a boolean mask survives (the image border counts as outside)."""
    cur = torch.from_numpy(mask.astype(np.float32))[None, None]
    depth = torch.zeros_like(cur)
    for _ in range(max_iter):
        depth += cur
        if not cur.any():
            break
        cur = -F.max_pool2d(-F.pad(cur, (1, 1, 1, 1), value=0.0), 3, 1)
    return depth[0, 0].numpy()


def choose_points(pred: np.ndarray, n: int = DEFAULT_POINTS, reach: int = 0) -> list[tuple[int, int]]:
    """Pick ``n`` spread-out output positions (x, y) inside different predicted classes.

    The two largest classes (usually background such as wall, floor, sky) alternate with the
    following ones (objects); each position lies deep inside its class and far from those already
    chosen. Too few suitable classes are filled up with far-apart positions. Positions keep ``reach``
    cells (the radius of the undeformed sampling grid), but at most a fifth of the map, from the border.
    """
    h, w = pred.shape
    ys, xs = np.mgrid[0:h, 0:w]
    min_sep = max(2.0, 0.15 * max(h, w))
    my = min(max(1, reach, round(0.1 * h)), round(0.2 * h), (h - 1) // 2)
    mx = min(max(1, reach, round(0.1 * w)), round(0.2 * w), (w - 1) // 2)
    inner = np.zeros((h, w), bool)  # keep the sampling clouds mostly inside the image
    inner[my : h - my, mx : w - mx] = True
    classes, areas = np.unique(pred, return_counts=True)
    by_area = [int(c) for c in classes[np.argsort(-areas, kind="stable")]]
    order = []
    background, objects = by_area[:2], by_area[2:]
    for pair in itertools.zip_longest(background, objects[: len(background)]):
        order += [c for c in pair if c is not None]
    order += objects[len(background) :]
    chosen: list[tuple[int, int]] = []

    def distance_to_chosen() -> np.ndarray:
        if not chosen:
            return np.full((h, w), np.inf)
        return np.min([np.hypot(xs - cx, ys - cy) for cx, cy in chosen], axis=0)

    for c in order:
        if len(chosen) == n:
            break
        depth = _interior_depth(pred == c)
        if depth.max() < 2:
            continue
        dist = distance_to_chosen()
        ok = (depth >= max(2, np.ceil(depth.max() / 2))) & (dist >= min_sep) & inner
        if not ok.any():
            continue
        score = np.where(ok, np.minimum(dist, 4 * min_sep) + 0.5 * depth, -np.inf)
        y, x = np.unravel_index(np.argmax(score), score.shape)
        chosen.append((int(x), int(y)))
    while len(chosen) < n:
        dist = np.where(inner, distance_to_chosen(), -np.inf)
        if not chosen:
            dist = np.where(inner, -np.hypot(xs - (w - 1) / 2, ys - (h - 1) / 2), -np.inf)
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        if chosen and (int(x), int(y)) in chosen:
            break
        chosen.append((int(x), int(y)))
    return chosen


# ---------------------------------------------------------------------------------------- drawing
@dataclass
class _Geometry:
    """Maps between original-image pixels and feature grids.

    Cell i of a grid with cumulative stride S covers network pixels [S*i, S*(i+1)), the convention of
    bilinear upsampling with align_corners=False, which is how predictions are scaled back to the
    image. (The receptive-field centre of a zero-padded ResNet lies (S-1)/2 pixels earlier.)
    Network pixels map to original pixels by the per-axis resize factors, pixel centres aligned.
    """

    orig_w: int
    orig_h: int
    net_w: int
    net_h: int

    def to_image(self, xy: np.ndarray, stride: float) -> np.ndarray:
        """Feature (x, y) of a grid with cumulative ``stride`` -> original-image pixel (x, y)."""
        scale = np.array([self.orig_w / self.net_w, self.orig_h / self.net_h])
        return (np.asarray(xy, dtype=np.float64) + 0.5) * stride * scale - 0.5

    def to_feature(self, xy: tuple[int, int], stride: float, size: tuple[int, int]) -> tuple[int, int]:
        """Original-image pixel (x, y) -> the cell (x, y) containing it, of a grid with (h, w) ``size``."""
        fx = (xy[0] + 0.5) * self.net_w / self.orig_w / stride - 0.5
        fy = (xy[1] + 0.5) * self.net_h / self.orig_h / stride - 0.5
        return int(np.clip(round(fx), 0, size[1] - 1)), int(np.clip(round(fy), 0, size[0] - 1))

    def extent(self, stride: float, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """imshow extent (left, right, bottom, top) of a feature map whose cells are ``stride`` pixels."""
        left, top = self.to_image(np.array([-0.5, -0.5]), stride)
        right, bottom = self.to_image(np.array([size[1] - 0.5, size[0] - 0.5]), stride)
        return left, right, bottom, top


def _dimmed(rgb: np.ndarray) -> np.ndarray:
    """The photo faded towards grey, so coloured points stand out but the scene stays legible."""
    img = rgb.astype(np.float32) / 255.0
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    faded = 0.35 * img + 0.65 * gray[..., None]
    return 0.18 + 0.55 * faded


def _class_info(num: int) -> tuple[list[str], np.ndarray]:
    """Class names and palette for ``num`` classes (the ADE20K ones when they fit)."""
    try:
        from data.dataset import load_class_info

        names, palette = load_class_info()
        if len(names) >= num:
            return names, palette
    except Exception:  # the figure must not fail over a missing class table
        pass
    rng = np.random.default_rng(0)
    return [f"class {i}" for i in range(num)], rng.integers(0, 256, (num, 3), dtype=np.uint8)


def _check_points(points: list[tuple[int, int]], width: int, height: int) -> None:
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise UserError(
                f"point {x},{y} lies outside the image, which is {width}x{height} pixels (x 0..{width - 1}, "
                f"y 0..{height - 1}). Give points as x,y pixel coordinates of the original image."
            )


def _cloud_view(geo: _Geometry, fields: list[LayerField], traces: list[list[tuple[np.ndarray, np.ndarray]]],
                box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Axis limits (left, right, bottom, top) showing the image and (nearly) all sampling locations.

    Locations can fall far beyond a small image, into the zero padding; the view grows to hold
    99% of them, by at most MAX_PADDING image sizes on each side.
    """
    xy = np.concatenate([geo.to_image(t[-1][0], fields[0].in_stride) for t in traces])
    left, right, bottom, top = box
    width, height = right - left, bottom - top
    lo, hi = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
    pad = 0.03 * max(width, height)
    new_left = max(min(left, lo[0] - pad), left - MAX_PADDING * width)
    new_right = min(max(right, hi[0] + pad), right + MAX_PADDING * width)
    new_top = max(min(top, lo[1] - pad), top - MAX_PADDING * height)
    new_bottom = min(max(bottom, hi[1] + pad), bottom + MAX_PADDING * height)
    return new_left, new_right, new_bottom, new_top


def _zoom_view(xy: np.ndarray, image_box: tuple[float, float, float, float],
               canvas: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Axis limits (left, right, bottom, top) of one point panel: the region its sampling locations occupy.

    The bounding box of ``xy`` (one position's locations and the position itself, image pixels) grows
    by ZOOM_MARGIN of its longer side on each side, then to the image's aspect ratio and to at least
    ZOOM_MIN of the image's shorter side. It is moved, not shrunk, to lie within the padded canvas of
    this position: the image and the grown bounding box, at most MAX_PADDING image sizes beyond the
    image; so it shows the zero padding only around locations that fall into it. A box as large as
    the image would zoom nothing: then the panel keeps ``canvas``, the widened view (``_cloud_view``)
    shared by all positions, as on small images whose locations reach far beyond them.
    """
    left, right, bottom, top = image_box
    img_w, img_h = right - left, bottom - top
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    margin = ZOOM_MARGIN * (hi - lo).max()
    lo, hi = lo - margin, hi + margin
    aspect = img_w / img_h
    width = max(hi[0] - lo[0], (hi[1] - lo[1]) * aspect, ZOOM_MIN * min(img_w, img_h) * max(aspect, 1.0))
    if width >= img_w:
        return canvas
    half = np.array([width, width / aspect]) / 2
    reach = MAX_PADDING * np.array([img_w, img_h])
    inner_lo = np.maximum(np.minimum([left, top], lo), np.array([left, top]) - reach) + half
    inner_hi = np.minimum(np.maximum([right, bottom], hi), np.array([right, bottom]) + reach) - half
    cx, cy = np.clip((lo + hi) / 2, inner_lo, np.maximum(inner_lo, inner_hi))
    return float(cx - half[0]), float(cx + half[0]), float(cy + half[1]), float(cy - half[1])


def _covers(box: tuple[float, float, float, float], image_box: tuple[float, float, float, float]) -> bool:
    """Whether the view ``box`` holds all of ``image_box`` (both as left, right, bottom, top)."""
    return box[0] <= image_box[0] and box[1] >= image_box[1] and box[2] >= image_box[2] and box[3] <= image_box[3]


def _draw_overview(ax: Axes, geo: _Geometry, pred: np.ndarray | None, palette: np.ndarray, stride: float,
                   feats: list[tuple[int, int]], zooms: list[tuple[float, float, float, float]]) -> None:
    """The image with the predicted classes, the numbered output positions (cell centres) and zoom regions.

    ``zooms`` are the views of the point panels; those smaller than the image are drawn as thin numbered
    rectangles.
    """
    if pred is not None:
        colours = palette[np.clip(pred, 0, len(palette) - 1)]
        ax.imshow(colours, extent=geo.extent(stride, pred.shape), alpha=0.45, interpolation="nearest")
    left, right, bottom, top = ax.get_xlim() + ax.get_ylim()
    step = 14.0 / _points_per_pixel(ax)  # a label's width, in image pixels
    placed: list[tuple[float, float]] = []
    for k, box in enumerate(zooms):
        if _covers(box, (left, right, bottom, top)):
            continue
        ax.add_patch(Rectangle((box[0], box[3]), box[1] - box[0], box[2] - box[3], fill=False, ec="white", lw=1.2,
                               zorder=2, path_effects=[patheffects.withStroke(linewidth=2.6, foreground="black")]))
        x, y = max(box[0], left), max(box[3], top)  # the top left corner, inside the panel
        while any(abs(x - px) < step and abs(y - py) < step for px, py in placed):
            x += step  # boxes often share a corner of the image
        placed.append((x, y))
        ax.annotate(str(k + 1), (x, y), xytext=(2.5, -2.5), textcoords="offset points", ha="left", va="top",
                    fontsize=8, fontweight="bold", zorder=4,
                    bbox=dict(boxstyle="square,pad=0.12", fc="white", ec="none", alpha=0.85))
    for k, (x, y) in enumerate(geo.to_image(np.array(feats, dtype=np.float64).reshape(-1, 2), stride)):
        ax.plot(x, y, marker="*", ms=17, mfc=OUTPUT_COLOUR, mec="black", mew=1.2, ls="none")
        ax.annotate(str(k + 1), (x, y), xytext=(8, 6), textcoords="offset points", fontsize=11, fontweight="bold",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    ax.set_title("prediction and output positions" if pred is not None else "output positions", fontsize=11)


def _draw_point(ax: Axes, geo: _Geometry, fields: list[LayerField], levels: list[tuple[np.ndarray, np.ndarray]],
                out_xy: np.ndarray, w_max: float) -> PathCollection:
    """One output position: its 9^L sampling locations, the last layer's own 9 samples, the position itself."""
    locs, weights = levels[-1]
    xy = geo.to_image(locs, fields[0].in_stride)
    size = _dot_size(ax, xy)
    if fields[0].mask is not None:
        order = np.argsort(weights, kind="stable")  # strongest on top
        dots = ax.scatter(xy[order, 0], xy[order, 1], c=weights[order], s=size, cmap=MASK_CMAP, vmin=0.0,
                          vmax=w_max, linewidths=0, alpha=0.9, zorder=3)
    else:
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=V1_COLOUR, s=size, linewidths=0, alpha=0.85, zorder=3)
    if len(levels) > 1:
        first = geo.to_image(levels[0][0], fields[-1].in_stride)
        ax.scatter(first[:, 0], first[:, 1], s=55, facecolors="none", edgecolors="white", linewidths=1.4, zorder=4)
    ax.plot(out_xy[0], out_xy[1], marker="*", ms=18, mfc=OUTPUT_COLOUR, mec="black", mew=1.2, ls="none", zorder=5)
    return dots


def _points_per_pixel(ax: Axes) -> float:
    """Typographic points per image pixel in the panel ``ax`` at its current limits (equal aspect)."""
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    pos, (fig_w, fig_h) = ax.get_position(), ax.figure.get_size_inches()
    return min(pos.width * fig_w / (right - left), pos.height * fig_h / (bottom - top)) * 72


def _dot_size(ax: Axes, xy: np.ndarray) -> float:
    """Marker area (points^2) that keeps the dots at ``xy`` apart at the zoom of the panel ``ax``.

    The diameter is about half the mean spacing of the locations on screen (their central 90% spread
    over their number), between 1.6 and 6 points.
    """
    lo, hi = np.percentile(xy, [5.0, 95.0], axis=0)
    spacing = np.sqrt(max(float(np.prod(hi - lo)), 1.0) / (0.81 * len(xy))) * _points_per_pixel(ax)
    return float(np.clip(0.5 * spacing, 1.6, 6.0) ** 2)


def _add_colorbar(fig: Figure, ax: Axes, mappable: Any, label: str | None = None) -> None:
    """A slim colourbar just right of ``ax`` that leaves the panel its full size."""
    cax = ax.inset_axes([1.025, 0.0, 0.04, 1.0])
    bar = fig.colorbar(mappable, cax=cax)
    bar.ax.tick_params(labelsize=8)
    if label:
        bar.set_label(label, fontsize=9)


def _layer_label(f: LayerField) -> str:
    return f"{f.name.replace('backbone.', '')} (dilation {f.dilation[0]})"


def offset_figure(
    model: nn.Module,
    image_tensor: torch.Tensor,
    original_rgb: np.ndarray,
    points: list[tuple[int, int]] | None = None,
    num_layers: int | None = None,
    iteration: int | None = None,
    image_name: str | None = None,
) -> np.ndarray:
    """Render the sampling locations and per-layer offset/mask maps of one image; return RGB uint8 (H, W, 3).

    Args:
        model: a model with deformable layers.
        image_tensor: the normalised network input (3, h, w), a resized version of ``original_rgb``.
        original_rgb: the original image, HxWx3 uint8.
        points: output positions as (x, y) pixels of the original image; None picks a few on
            different predicted classes.
        num_layers: how many stacked deformable layers to trace (default: up to 3).
        iteration: training iteration of the weights, shown in the title.
        image_name: shown in the title.
    """
    orig_h, orig_w = original_rgb.shape[:2]
    if points:
        _check_points(points, orig_w, orig_h)
    logits, all_fields = run_with_fields(model, image_tensor)
    fields = _select_layers(all_fields, num_layers)
    last, num_l = fields[-1], len(fields)
    v2 = all(f.mask is not None for f in fields)
    geo = _Geometry(orig_w, orig_h, image_tensor.shape[-1], image_tensor.shape[-2])
    names, palette = _class_info(logits.shape[1] if logits is not None else 1)
    pred = None
    if logits is not None:
        pred_t = logits.argmax(1, keepdim=True).float()
        pred = F.interpolate(pred_t, size=last.out_size, mode="nearest")[0, 0].long().cpu().numpy()
    if not points:
        reach = sum(f.dilation[0] * (f.kernel[0] // 2) for f in fields)
        feats = choose_points(pred if pred is not None else np.zeros(last.out_size, int), reach=reach)
        shown = [tuple(int(v) for v in np.rint(geo.to_image(np.array(p), last.out_stride))) for p in feats]
    else:
        feats = [geo.to_feature(p, last.out_stride, last.out_size) for p in points]
        shown = list(points)
    traces = [trace(fields, p) for p in feats]
    w_max = max(float(t[-1][1].max()) for t in traces) if v2 else 1.0

    # Layout: the overview and one panel per position, then the per-layer maps; each section starts a row.
    ncols = 3 if num_l <= 3 else 4
    sections = [["overview"] + [("point", i) for i in range(len(feats))], [("offset", j) for j in range(num_l)]]
    if v2 and 2 * num_l <= ncols:
        sections[1] += [("mask", j) for j in range(num_l)]
    elif v2:
        sections.append([("mask", j) for j in range(num_l)])
    stack = f"{num_l} stacked deformable layers" if num_l > 1 else "one deformable layer"
    head = [f"DCNv{last.version} sampling locations through {stack}: {9 ** num_l} per output position"]
    if iteration is not None:
        head.append(f"iteration {iteration}")
    if image_name:
        head.append(image_name)
    legend = (
        "green star: output position"
        + ("; white rings: the last layer's own 9 samples" if num_l > 1 else "")
        + (("; dots: final locations, coloured by the product of the masks along their path" if num_l > 1
            else "; dots: sampling locations, coloured by their mask") if v2
           else "; red dots: final sampling locations")
        + f". Layers: {', '.join(_layer_label(f) for f in fields)}"
        + (f"; offsets averaged over {last.groups} deformable groups" if last.groups > 1 else "")
    )
    rows = sum(-(-len(s) // ncols) for s in sections)
    panel_w, title_h = 4.6, 0.7
    fig_w = ncols * panel_w * 1.17 + 0.3
    lines = ["   |   ".join(head)] + textwrap.wrap(legend, width=int(fig_w * 90 / 7.2))
    header_h = 0.3 + 0.27 * len(lines)
    panel_h = panel_w * orig_h / orig_w
    fig_h = rows * (panel_h + title_h) + header_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=90)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, ncols, left=0.015, right=1 - 0.85 / fig_w, bottom=0.1 / fig_h,
                            top=1 - header_h / fig_h, wspace=0.2, hspace=title_h / panel_h)
    background = _dimmed(original_rgb)
    image_box = (-0.5, orig_w - 0.5, orig_h - 0.5, -0.5)
    cloud_box = _cloud_view(geo, fields, traces, image_box)
    zooms = []
    for feat, levels in zip(feats, traces):
        out_xy = geo.to_image(np.array(feat, float), last.out_stride)
        zooms.append(_zoom_view(np.vstack([geo.to_image(levels[-1][0], fields[0].in_stride), out_xy]), image_box,
                                cloud_box))
    row, point_bar = 0, False
    for section in sections:
        for idx, panel in enumerate(section):
            ax = fig.add_subplot(grid[row + idx // ncols, idx % ncols])
            ax.imshow(background, extent=image_box, interpolation="bilinear")
            box = zooms[panel[1]] if panel != "overview" and panel[0] == "point" else image_box
            ax.set_xlim(box[0], box[1])
            ax.set_ylim(box[2], box[3])
            if box != image_box:  # locations beyond the border fall in the zero padding
                ax.set_facecolor(PADDING_COLOUR)
                ax.add_patch(Rectangle((image_box[0], image_box[3]), orig_w, orig_h, fill=False, ec="black", lw=0.8))
            ax.set_xticks([])
            ax.set_yticks([])
            if panel == "overview":
                _draw_overview(ax, geo, pred, palette, last.out_stride, feats, zooms)
                continue
            kind, i = panel
            if kind == "point":
                out_xy = geo.to_image(np.array(feats[i], float), last.out_stride)
                dots = _draw_point(ax, geo, fields, traces[i], out_xy, w_max)
                label = ""
                if pred is not None:
                    cls = int(pred[feats[i][1], feats[i][0]])
                    label = f": {names[cls]}" if cls < len(names) else f": class {cls}"
                ax.set_title(f"{i + 1}  (x {shown[i][0]}, y {shown[i][1]}){label}", fontsize=11)
                if v2 and not point_bar and (idx % ncols == ncols - 1 or idx == len(section) - 1):
                    _add_colorbar(fig, ax, dots, f"product of the {num_l} masks" if num_l > 1 else "mask")
                    point_bar = True  # one shared scale, at the end of the first row
                continue
            f = fields[i]
            if kind == "offset":
                data, cmap = f.magnitude, "magma"
                title = f"{_layer_label(f)}\nmean |offset| over taps: {data.mean():.2f} feature px on average"
            else:
                data, cmap = f.mask.mean(0), "viridis"
                title = f"{_layer_label(f)}\nmean mask over taps: {data.mean():.2f} on average"
            im = ax.imshow(data, extent=geo.extent(f.out_stride, f.out_size), cmap=cmap, alpha=0.75,
                           interpolation="bilinear")
            ax.set_title(title, fontsize=10.5)
            _add_colorbar(fig, ax, im)
        row += -(-len(section) // ncols)

    fig.text(0.5, 1 - 0.15 / fig_h, "\n".join(lines), ha="center", va="top", fontsize=11.5, linespacing=1.45)
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


# ------------------------------------------------------------------------------------ command line
def parse_points(texts: list[str]) -> list[tuple[int, int]]:
    """Parse ``x,y`` strings into integer pixel positions, or raise UserError naming the bad one."""
    points = []
    for text in texts:
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            x, y = (int(round(float(p))) for p in parts)
        except ValueError:
            raise UserError(
                f"--points value '{text}' is not a pixel position. Give each point as x,y in pixels of the original "
                f"image, for example --points 120,80 300,200."
            ) from None
        points.append((x, y))
    return points


def load_image(path: Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, or raise UserError saying what is wrong."""
    if not path.is_file():
        raise UserError(f"image {path} does not exist or is not a file. Give the path of a JPEG or PNG image.")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(
            f"could not read image {path} ({type(err).__name__}: {err}). Give a JPEG or PNG image that opens in "
            f"an image viewer."
        ) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Draw the sampling locations of a checkpoint's stacked deformable convolutions for a few output\n"
            "positions of one image, as in Figs. 5-6 of the DCNv1 paper: 9 points per layer, 9^L through L\n"
            "layers, coloured by the product of the modulation masks for DCNv2. Beside them: per-layer maps\n"
            "of the mean offset magnitude and, for DCNv2, of the mean mask. The image is resized as in\n"
            "evaluation (data.scale of the checkpoint's config)."
        ),
        epilog=(
            "example:\n"
            "  python scripts/visualize_offsets.py --checkpoint runs/def-conv-v2/best.pt \\\n"
            "      --image ADE_val_00000001.jpg --points 300,200 500,380 --out offsets.png"
        ),
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by train.py (best.pt, last.pt)")
    parser.add_argument("--image", required=True, type=Path, help="image to draw on (any size; resized as in evaluation)")
    parser.add_argument("--points", nargs="+", default=None, metavar="X,Y",
                        help="output positions in pixels of the original image (default: a few on different classes)")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help=f"trace the last N deformable layers (default: up to {DEFAULT_LAYERS}, at most {MAX_LAYERS})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the script; return the exit status (2 for a usage or input error)."""
    args = parse_args(argv)
    try:
        from data.transforms import ValTransform
        from evaluate import build_model_from_checkpoint, load_checkpoint

        points = parse_points(args.points) if args.points else None
        rgb = load_image(args.image)
        if points is not None:
            _check_points(points, rgb.shape[1], rgb.shape[0])
        checkpoint = load_checkpoint(args.checkpoint)
        model, config = build_model_from_checkpoint(checkpoint, args.checkpoint)
        if not deformable_layers(model):
            raise UserError(
                f"this checkpoint has no deformable layers: {args.checkpoint} holds a plain model "
                f"(model.deform.version is 0), so there are no offsets to draw. Give a checkpoint of a "
                f"def-conv-v1 or def-conv-v2 run."
            )
        check_num_layers(args.layers, list(deformable_layers(model)))
        image_tensor = ValTransform(config["data"])(Image.fromarray(rgb))
        figure = offset_figure(model, image_tensor, rgb, points, num_layers=args.layers,
                               iteration=checkpoint.get("iteration"), image_name=args.image.name)
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(figure).save(args.out, format="PNG")
        except (OSError, ValueError) as err:
            raise UserError(f"could not write {args.out} ({err}). Give a writable path ending in .png.") from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
