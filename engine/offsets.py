"""Offsets of deformable layers: capturing them in a forward pass, and tracing sampling locations.

``capture_offsets`` records what the deformable layers predicted (for TensorBoard, the sampling-location figure and
the benchmark) with a forward hook on each layer's offset predictor, so nothing runs twice.

The tracing follows Figs. 5 and 6 of the DCNv1 paper (Dai et al., "Deformable Convolutional Networks", ICCV
2017): for one output position of the last deformable layer, its 9 sampling locations are
``p * stride - padding + dilation * tap + offset(p, tap)`` in that layer's input grid. Each of them is followed back
through the previous deformable layer, whose offset (and mask) field is interpolated bilinearly at the fractional
location, giving 9^2 locations for two layers and 9^3 for three. In the ResNet-50 FCN at output stride 8 the layers
between the deformable convs are 1x1 convs, so a position carries over unchanged; strides between layers are handled
through each layer's cumulative stride. For DCNv2 (Zhu et al. 2019) each location is weighted by the product of the
modulation masks along its path. Several deformable groups are averaged. Drawing lives in ``engine.offset_figure``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_cdt, map_coordinates
from torch import nn

from configs import UserError
from models.deform_conv import DeformConv2d
from models.segmentor import deformable_layers

DEFAULT_LAYERS = 3  # the three conv2 of layer4 in the default configs
MAX_LAYERS = 4  # 9^4 = 6561 locations per position; more is unreadable
DEFAULT_POINTS = 5  # with the overview, two full rows of three panels


@dataclass
class Capture:
    """What one deformable layer predicted in one forward call: its input size, offsets and mask (v2).

    ``offsets`` is (N, 2*G*K, H, W) and ``mask`` (N, G*K, H, W) in [0, 1] or None, in the dtype the
    layer ran in (bf16 under autocast).
    """

    name: str
    layer: DeformConv2d
    in_channels: int
    in_size: tuple[int, int]
    offsets: torch.Tensor
    mask: torch.Tensor | None


@contextmanager
def capture_offsets(model: nn.Module) -> Iterator[dict[str, list[Capture]]]:
    """Within the block, record every deformable layer's offsets and masks, per layer name, in call order.

    Works through DDP and torch.compile wrappers (hooks sit on the layers' offset predictors).
    """
    captured: dict[str, list[Capture]] = {name: [] for name in deformable_layers(model)}

    def hook(name: str, layer: DeformConv2d):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            offsets, mask = layer.split(output.detach())
            x = inputs[0]
            captured[name].append(Capture(name, layer, x.shape[1], tuple(x.shape[-2:]), offsets, mask))
        return record

    handles = [layer.offset_conv.register_forward_hook(hook(name, layer)) for name, layer in deformable_layers(model).items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


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


def fields_from_captures(captures: list[Capture], net_size: tuple[int, int]) -> list[LayerField]:
    """The ``LayerField`` of the first image of each capture (one per layer, in forward order)."""
    fields = []
    for c in captures:
        kh, kw = c.layer.weight.shape[-2:]
        groups, taps = c.layer.deform_groups, kh * kw
        h, w = c.offsets.shape[-2:]
        raw = c.offsets[0].double().cpu().reshape(groups, taps, 2, h, w)  # reshape: may be channels_last
        msk = None if c.mask is None else c.mask[0].double().cpu().reshape(groups, taps, h, w).mean(0).numpy()
        fields.append(
            LayerField(
                name=c.name, version=c.layer.version, groups=groups, offsets=raw.mean(0).numpy(), mask=msk,
                magnitude=raw.norm(dim=2).mean((0, 1)).numpy(), kernel=(kh, kw),
                stride=tuple(c.layer.stride), padding=tuple(c.layer.padding), dilation=tuple(c.layer.dilation),
                in_stride=_pow2_stride(net_size, c.in_size), out_stride=_pow2_stride(net_size, (h, w)),
            )
        )
    return fields


@torch.no_grad()
def run_with_fields(model: nn.Module, image_tensor: torch.Tensor) -> tuple[torch.Tensor, list[LayerField]]:
    """Run the model once in eval mode; return its logits (1, C, h', w') and every deformable layer's field.

    ``image_tensor`` is one normalised image (3, h, w). Layers come in the order the forward pass calls them; the
    model's train/eval mode is restored.
    """
    x = image_tensor[None].to(device=next(model.parameters()).device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with capture_offsets(model) as captured:
            logits = model(x)["out"]
    finally:
        model.train(was_training)
    # Module order is call order in a ResNet; each layer's first call is this image's.
    first_calls = [calls[0] for calls in captured.values()]
    return logits, fields_from_captures(first_calls, tuple(x.shape[-2:]))


def _bilinear(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample a (C, H, W) field at fractional (x, y) positions, clamped to the grid; returns (P, C)."""
    return np.stack([map_coordinates(channel, [y, x], order=1, mode="nearest") for channel in field], axis=1)


def trace(fields: list[LayerField], point: tuple[float, float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Follow the (x, y) ``point`` of ``fields[-1]``'s output grid back through ``fields`` (shallowest first).

    Returns one (locations (9^j, 2) as (x, y), weights (9^j,)) per level j = 1..L, level j in the input grid of
    ``fields[-j]``; the 9 children of location i of level j are rows 9i..9i+8 of level j + 1, in row-major tap
    order. Weights are the products of the masks along the path (ones for v1).
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


def effective_dilation(offsets: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """DCNv1's effective dilation (Dai et al. 2017, section 4.1 and Table 2) at every output position.

    The mean distance between adjacent sampling locations of the kernel (each tap and its right and lower
    neighbours), in the layer's input pixels: a plain layer's dilation where the offsets are zero, s times it where
    they scale the sampling grid by s. The v2 mask is not part of it; deformable groups are averaged. ``offsets``
    is (N, 2*G*kh*kw, H, W) in torchvision's layout (groups, then taps row-major, then y and x); returns (N, H, W).
    """
    n, _, h, w = offsets.shape
    kh, kw = kernel
    taps = torch.stack(torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij"), -1) * torch.tensor(dilation)
    grid = offsets.float().reshape(n, -1, kh, kw, 2, h, w) + taps.to(offsets.device)[..., None, None]  # (y, x) per tap
    across = (grid[:, :, :, 1:] - grid[:, :, :, :-1]).norm(dim=4).flatten(2, 3)  # (N, G, kh*(kw-1), H, W)
    down = (grid[:, :, 1:] - grid[:, :, :-1]).norm(dim=4).flatten(2, 3)
    return torch.cat([across, down], 2).mean((1, 2))


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


def _interior_depth(mask: np.ndarray, max_iter: int = 12) -> np.ndarray:
    """How many 3x3 erosions each cell of a boolean mask survives (the image border counts as outside), at most
    ``max_iter``: its chessboard distance to the nearest cell outside."""
    return np.minimum(distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1], max_iter)


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
    pairs = itertools.zip_longest(by_area[:2], by_area[2:4])  # background, object, background, object, the rest
    order = [c for pair in pairs for c in pair if c is not None] + by_area[4:]
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
        dist = distance_to_chosen() if chosen else -np.hypot(xs - (w - 1) / 2, ys - (h - 1) / 2)  # first: the centre
        dist = np.where(inner, dist, -np.inf)
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        if (int(x), int(y)) in chosen:
            break
        chosen.append((int(x), int(y)))
    return chosen
