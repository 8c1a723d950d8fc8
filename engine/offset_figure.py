"""The sampling-location figure of stacked deformable convolutions (DCNv1 Figs. 5 and 6), drawn with matplotlib.

For a few output positions it draws the 9^L locations traced by ``engine.offsets.trace`` (coloured by
the product of the v2 masks), beside per-layer maps of offset magnitude and mean mask. Each position's
panel zooms to the region its locations occupy (on small images, where they reach far beyond the
image, it shows the image and the padding around it); the overview marks these regions with numbered
rectangles. ``offset_figure`` returns the figure as an RGB array. matplotlib is used through its object API
(Figure and the Agg canvas), so no global backend is set.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from data.dataset import load_class_info
from engine.offsets import LayerField, check_num_layers, choose_points, run_with_fields, trace

OUTPUT_COLOUR = "#39ff14"  # the output position, as the green point of DCNv1 Fig. 5
V1_COLOUR = "#ff2a2a"
PADDING_COLOUR = "#e4e4e4"  # outside the image, where the convolutions read zeros
MAX_PADDING = 0.6  # views reach at most this many image sizes into the padding, so the image stays legible
ZOOM_MARGIN = 0.15  # a point panel shows its locations' bounding box grown by this part of its longer side
ZOOM_MIN = 0.25  # ... and at least this part of the image's shorter side, so tiny spreads are not blown up
# plasma without its darkest quarter, so weak locations stay visible on the dimmed photo
MASK_CMAP = ListedColormap(matplotlib.colormaps["plasma"](np.linspace(0.22, 1.0, 256)), name="plasma_light")


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
    """Class names and palette for ``num`` classes (the ADE20K ones when they fit, else numbered random colours)."""
    names, palette = load_class_info()
    if len(names) >= num:
        return names, palette
    return [f"class {i}" for i in range(num)], np.random.default_rng(0).integers(0, 256, (num, 3), dtype=np.uint8)


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


def _draw_overview(ax: Axes, geo: _Geometry, pred: np.ndarray, palette: np.ndarray, stride: float,
                   feats: list[tuple[int, int]], zooms: list[tuple[float, float, float, float]]) -> None:
    """The image with the predicted classes, the numbered output positions (cell centres) and zoom regions.

    ``zooms`` are the views of the point panels; those smaller than the image are drawn as thin numbered
    rectangles.
    """
    ax.imshow(palette[pred], extent=geo.extent(stride, pred.shape), alpha=0.45, interpolation="nearest")
    left, right, bottom, top = ax.get_xlim() + ax.get_ylim()
    step = 14.0 / _points_per_pixel(ax)  # a label's width, in image pixels
    placed: list[tuple[float, float]] = []
    for k, box in enumerate(zooms):
        if box[1] - box[0] >= right - left:  # the shared widened view (``_zoom_view``) zooms nothing
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
    ax.set_title("prediction and output positions", fontsize=11)


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
    observed: tuple[torch.Tensor, list[LayerField]] | None = None,
) -> np.ndarray:
    """Render the sampling locations and per-layer offset/mask maps of one image; return RGB uint8 (H, W, 3).

    ``image_tensor`` is the normalised network input (3, h, w) made from ``original_rgb`` (HxWx3 uint8);
    ``points`` are (x, y) pixels of the original, checked by the caller (None picks a few on different predicted
    classes); ``num_layers`` stacked layers are traced (default: up to 3). ``observed`` is the (1/8 logits, layer
    fields) of the image when the caller already ran the model (TensorBoard's panels do); None runs it here.
    """
    orig_h, orig_w = original_rgb.shape[:2]
    logits, all_fields = observed if observed is not None else run_with_fields(model, image_tensor)
    fields = all_fields[-check_num_layers(num_layers, [f.name for f in all_fields]) :]
    geo = _Geometry(orig_w, orig_h, image_tensor.shape[-1], image_tensor.shape[-2])
    pred_t = logits.argmax(1, keepdim=True).float()
    pred = F.interpolate(pred_t, size=fields[-1].out_size, mode="nearest")[0, 0].long().cpu().numpy()
    if not points:
        reach = sum(f.dilation[0] * (f.kernel[0] // 2) for f in fields)
        feats = choose_points(pred, reach=reach)
        points = [tuple(int(v) for v in np.rint(geo.to_image(np.array(p), fields[-1].out_stride))) for p in feats]
    else:
        feats = [geo.to_feature(p, fields[-1].out_stride, fields[-1].out_size) for p in points]
    scene = _Scene(geo, fields, pred, _class_info(logits.shape[1]), feats, points, [trace(fields, p) for p in feats],
                   original_rgb)
    fig, grid, sections, ncols = _layout(scene, _header(fields, iteration, image_name))
    _draw_panels(fig, grid, sections, ncols, scene)
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


@dataclass
class _Scene:
    """What the figure shows: the layers traced, the prediction, the output positions and their traces."""

    geo: _Geometry
    fields: list[LayerField]
    pred: np.ndarray
    classes: tuple[list[str], np.ndarray]  # names and palette
    feats: list[tuple[int, int]]  # positions on the last layer's grid
    shown: list[tuple[int, int]]  # the same positions in image pixels
    traces: list[list[tuple[np.ndarray, np.ndarray]]]
    rgb: np.ndarray


def _header(fields: list[LayerField], iteration: int | None, image_name: str | None) -> tuple[list[str], str]:
    """The title's parts and the legend."""
    last, num_l, v2 = fields[-1], len(fields), all(f.mask is not None for f in fields)
    stack = f"{num_l} stacked deformable layers" if num_l > 1 else "one deformable layer"
    head = [f"DCNv{last.version} sampling locations through {stack}: {9 ** num_l} per output position"]
    head += [f"iteration {iteration}"] if iteration is not None else []
    head += [image_name] if image_name else []
    legend = (
        "green star: output position"
        + ("; white rings: the last layer's own 9 samples" if num_l > 1 else "")
        + (("; dots: final locations, coloured by the product of the masks along their path" if num_l > 1
            else "; dots: sampling locations, coloured by their mask") if v2
           else "; red dots: final sampling locations")
        + f". Layers: {', '.join(_layer_label(f) for f in fields)}"
        + (f"; offsets averaged over {last.groups} deformable groups" if last.groups > 1 else "")
    )
    return head, legend


def _layout(scene: _Scene, header: tuple[list[str], str]) -> tuple[Figure, Any, list[list[Any]], int]:
    """The figure with its title: the overview and one panel per position, then the per-layer maps; each section
    starts a row. Returns the figure, its grid, the sections and the number of columns."""
    num_l, v2 = len(scene.fields), all(f.mask is not None for f in scene.fields)
    ncols = 3 if num_l <= 3 else 4
    sections = [["overview"] + [("point", i) for i in range(len(scene.feats))], [("offset", j) for j in range(num_l)]]
    if v2 and 2 * num_l <= ncols:
        sections[1] += [("mask", j) for j in range(num_l)]
    elif v2:
        sections.append([("mask", j) for j in range(num_l)])
    rows = sum(-(-len(s) // ncols) for s in sections)
    panel_w, title_h = 4.6, 0.7
    fig_w = ncols * panel_w * 1.17 + 0.3
    lines = ["   |   ".join(header[0])] + textwrap.wrap(header[1], width=int(fig_w * 90 / 7.2))
    header_h = 0.3 + 0.27 * len(lines)
    panel_h = panel_w * scene.geo.orig_h / scene.geo.orig_w
    fig_h = rows * (panel_h + title_h) + header_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=90)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, ncols, left=0.015, right=1 - 0.85 / fig_w, bottom=0.1 / fig_h,
                            top=1 - header_h / fig_h, wspace=0.2, hspace=title_h / panel_h)
    fig.text(0.5, 1 - 0.15 / fig_h, "\n".join(lines), ha="center", va="top", fontsize=11.5, linespacing=1.45)
    return fig, grid, sections, ncols


def _draw_panels(fig: Figure, grid: Any, sections: list[list[Any]], ncols: int, scene: _Scene) -> None:
    """Every panel of ``_layout``'s sections on the dimmed photo: the overview, the positions, the layer maps."""
    geo, fields, last = scene.geo, scene.fields, scene.fields[-1]
    v2 = all(f.mask is not None for f in fields)
    w_max = max(float(t[-1][1].max()) for t in scene.traces) if v2 else 1.0
    background, image_box = _dimmed(scene.rgb), (-0.5, geo.orig_w - 0.5, geo.orig_h - 0.5, -0.5)
    cloud_box = _cloud_view(geo, fields, scene.traces, image_box)
    outs = [geo.to_image(np.array(feat, float), last.out_stride) for feat in scene.feats]
    zooms = [_zoom_view(np.vstack([geo.to_image(levels[-1][0], fields[0].in_stride), out]), image_box, cloud_box)
             for out, levels in zip(outs, scene.traces)]
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
                ax.add_patch(Rectangle((image_box[0], image_box[3]), geo.orig_w, geo.orig_h, fill=False, ec="black",
                                       lw=0.8))
            ax.set_xticks([])
            ax.set_yticks([])
            if panel == "overview":
                _draw_overview(ax, geo, scene.pred, scene.classes[1], last.out_stride, scene.feats, zooms)
            elif panel[0] == "point":
                i = panel[1]
                dots = _draw_point(ax, geo, fields, scene.traces[i], outs[i], w_max)
                name = scene.classes[0][scene.pred[scene.feats[i][1], scene.feats[i][0]]]
                ax.set_title(f"{i + 1}  (x {scene.shown[i][0]}, y {scene.shown[i][1]}): {name}", fontsize=11)
                if v2 and not point_bar and (idx % ncols == ncols - 1 or idx == len(section) - 1):
                    _add_colorbar(fig, ax, dots, f"product of the {len(fields)} masks" if len(fields) > 1 else "mask")
                    point_bar = True  # one shared scale, at the end of the first row
            else:
                _draw_layer_map(fig, ax, geo, fields[panel[1]], panel[0])
        row += -(-len(section) // ncols)


def _draw_layer_map(fig: Figure, ax: Axes, geo: _Geometry, f: LayerField, kind: str) -> None:
    """One layer's map over the photo: its mean offset magnitude (``offset``) or mean mask (``mask``)."""
    if kind == "offset":
        data, cmap = f.magnitude, "magma"
        title = f"{_layer_label(f)}\nmean |offset| over taps: {data.mean():.2f} feature px on average"
    else:
        data, cmap = f.mask.mean(0), "viridis"
        title = f"{_layer_label(f)}\nmean mask over taps: {data.mean():.2f} on average"
    im = ax.imshow(data, extent=geo.extent(f.out_stride, f.out_size), cmap=cmap, alpha=0.75, interpolation="bilinear")
    ax.set_title(title, fontsize=10.5)
    _add_colorbar(fig, ax, im)
