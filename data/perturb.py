"""Geometric perturbations of a validation image and its label, for robustness evaluation.

Each perturbation warps the image and its label together at the original size, before the validation transform,
by inverse mapping: every output pixel centre (x, y) reads the source point (xs, ys) computed below, with pixel
centres at integer coordinates and the centre of the image at ((W - 1) / 2, (H - 1) / 2). The image is resampled
bilinearly (torch ``grid_sample``), the label with nearest neighbour (the source pixel ``floor(xs + 0.5)``).
Output pixels whose source point lies outside the image (outside [-0.5, W - 0.5) x [-0.5, H - 0.5)) get label 255
(``data.IGNORE_INDEX``, not scored) and the ImageNet mean colour (123.675, 116.28, 103.53, rounded), which the
validation transform normalises to about 0: what the model saw as padding in training.

Kinds (``KIND=VALUE``, see :func:`parse_perturbation`):

- ``rotate=A``: rotation by A degrees about the centre, counter-clockwise as displayed for A > 0 (PIL's and
  torchvision's convention; ``rotate=90`` on a square image equals ``np.rot90``).
- ``scale=S``: isotropic zoom by S > 0 about the centre, same output size (S < 1 shrinks the content and leaves an
  ignored border; S > 1 crops).
- ``shear=K``: horizontal shear by factor K = tan(shear angle) about the centre row: content at row y moves right
  by K * (y - (H - 1) / 2) pixels.
- ``elastic=A`` or ``elastic=A:G``: smooth random displacement field (Simard et al. 2003): the x and y
  displacements at grid nodes every G pixels (default 64) are independent N(0, A^2) pixels, bicubically
  interpolated in between (typical displacement a little below A). The field is drawn from a numpy Generator
  seeded from (global seed, image key), so a given image gets the same warp in every run and every process.

A value of 0 (1 for ``scale``) is the identity and returns the inputs unchanged (copies), bit for bit. Values outside
:data:`RANGES` are refused (:data:`HELP` states them): every rotation is within +-180 degrees; beyond 4x (or below
0.25x) a scale leaves one object (or a sixteenth of the image) to score, beyond a shear of 1 (45 degrees) most of the
image leaves the frame; an elastic amplitude above a quarter of its grid spacing folds more and more of the image over
itself, and a grid beyond 256 pixels moves whole images rather than warping them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import IGNORE_INDEX

KINDS = ("rotate", "scale", "shear", "elastic")
IDENTITY = {"rotate": 0.0, "scale": 1.0, "shear": 0.0, "elastic": 0.0}
DEFAULT_ELASTIC_SPACING = 64.0
MEAN_FILL = (124, 116, 104)  # ImageNet mean (123.675, 116.28, 103.53) rounded: about 0 after normalisation
_EXAMPLES = "rotate=15, scale=0.75, shear=0.2, elastic=8 or elastic=8:64"
RANGES = {"rotate": (-180.0, 180.0), "scale": (0.25, 4.0), "shear": (-1.0, 1.0)}  # inclusive
ELASTIC_SPACING_RANGE = (8.0, 256.0)  # pixels, inclusive
ELASTIC_MAX_RATIO = 0.25  # amplitude / spacing
HELP = (
    f"rotate=DEGREES ({RANGES['rotate'][0]:g} to {RANGES['rotate'][1]:g}), scale=FACTOR ({RANGES['scale'][0]:g} to "
    f"{RANGES['scale'][1]:g}), shear=FACTOR ({RANGES['shear'][0]:g} to {RANGES['shear'][1]:g}, the tangent of the "
    f"angle) or elastic=PIXELS[:GRID] (0 to GRID/{1 / ELASTIC_MAX_RATIO:g} pixels; GRID {ELASTIC_SPACING_RANGE[0]:g} "
    f"to {ELASTIC_SPACING_RANGE[1]:g} pixels, default {DEFAULT_ELASTIC_SPACING:g})"
)


@dataclass(frozen=True)
class Perturbation:
    """One geometric perturbation, as ``parse_perturbation`` checked it; call it on (image, label, key).

    ``value`` is in degrees (rotate), a factor (scale, shear) or pixels (elastic); ``spacing`` is the elastic grid's
    in pixels, ``seed`` the elastic field's global seed (combined with each image's key).
    """

    kind: str
    value: float
    spacing: float = DEFAULT_ELASTIC_SPACING
    seed: int = 0

    def __str__(self) -> str:
        """The canonical ``KIND=VALUE`` text (``elastic=A:G`` when G is not the default)."""
        text = f"{self.kind}={self.value:g}"
        if self.kind == "elastic" and self.spacing != DEFAULT_ELASTIC_SPACING:
            text += f":{self.spacing:g}"
        return text

    def __call__(self, image: Image.Image, label: np.ndarray, key: str | int = 0) -> tuple[Image.Image, np.ndarray]:
        """Warp a PIL image and its HxW uint8 label together, at the original size; ``key`` (the image's name) seeds
        random perturbations. Returns a PIL RGB image and the label; the identity returns copies of the inputs."""
        if self.value == IDENTITY[self.kind]:
            return image.convert("RGB").copy(), label.copy()
        height, width = label.shape
        xs, ys = source_coordinates(self, height, width, key)
        inside = (xs >= -0.5) & (xs < width - 0.5) & (ys >= -0.5) & (ys < height - 0.5)
        xi = np.clip(np.floor(xs + 0.5), 0, width - 1).astype(np.intp)
        yi = np.clip(np.floor(ys + 0.5), 0, height - 1).astype(np.intp)
        out_label = np.where(inside, label[yi, xi], IGNORE_INDEX).astype(label.dtype)
        # grid_sample with align_corners=False: normalised -1 and 1 are the outer edges of the border pixels.
        grid = torch.stack([torch.from_numpy(xs * np.float32(2 / width) + np.float32(1 / width - 1)),
                            torch.from_numpy(ys * np.float32(2 / height) + np.float32(1 / height - 1))], dim=-1)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        warped = F.grid_sample(pixels, grid[None], mode="bilinear", padding_mode="border",
                               align_corners=False)[0].permute(1, 2, 0).numpy()
        warped = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
        warped[~inside] = MEAN_FILL
        return Image.fromarray(warped, "RGB"), out_label


def _problem(kind: str, value: float, spacing: float) -> str:
    """Why (kind, value, spacing) is not a valid perturbation, or ""."""
    if not math.isfinite(value):
        return "the value must be a finite number"
    if kind in RANGES and not RANGES[kind][0] <= value <= RANGES[kind][1]:
        return f"{kind} must be between {RANGES[kind][0]:g} and {RANGES[kind][1]:g}, got {value:g}"
    low, high = ELASTIC_SPACING_RANGE
    if not (math.isfinite(spacing) and low <= spacing <= high):
        return f"the elastic grid spacing must be between {low:g} and {high:g} pixels, got {spacing:g}"
    if kind == "elastic" and not 0 <= value <= ELASTIC_MAX_RATIO * spacing:
        return (f"elastic needs an amplitude between 0 and {ELASTIC_MAX_RATIO * spacing:g} pixels (a quarter of the "
                f"grid spacing {spacing:g}; more folds the image over itself), got {value:g}")
    return ""


def _error(text: str, why: str) -> str:
    return f"bad perturbation {text!r}: {why}; use KIND=VALUE with KIND one of {', '.join(KINDS)} (e.g. {_EXAMPLES})"


def parse_perturbation(text: str, seed: int = 0) -> Perturbation:
    """Parse ``KIND=VALUE`` (``rotate=15``, ``scale=0.75``, ``shear=0.2``, ``elastic=8``, ``elastic=8:32``: amplitude
    and grid spacing in pixels); ValueError in one line naming the bad text and the allowed kinds."""
    kind, sep, value = str(text).strip().partition("=")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or not kind or not value:
        raise ValueError(_error(text, "expected KIND=VALUE"))
    if kind not in KINDS:
        raise ValueError(_error(text, f"unknown kind {kind!r}"))
    parts = value.split(":")
    if len(parts) > (2 if kind == "elastic" else 1):
        raise ValueError(_error(text, "only elastic takes a second number (elastic=AMPLITUDE:SPACING)"))
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ValueError(_error(text, f"{value!r} is not a number")) from None
    spacing = numbers[1] if len(numbers) > 1 else DEFAULT_ELASTIC_SPACING
    why = _problem(kind, numbers[0], spacing)
    if why:
        raise ValueError(_error(text, why))
    return Perturbation(kind, numbers[0], spacing=spacing, seed=seed)


def perturbation_seed(key: str | int, seed: int = 0) -> int:
    """A 63-bit seed for image ``key`` (its name or index) under global ``seed``; stable across runs and processes."""
    digest = hashlib.blake2b(f"{int(seed)}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def source_coordinates(
    perturbation: Perturbation, height: int, width: int, key: str | int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Source point (xs, ys) in input pixel coordinates of every output pixel, each HxW float32."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    dx, dy = xs - cx, ys - cy
    kind, v = perturbation.kind, perturbation.value
    if kind == "rotate":
        c, s = np.float32(math.cos(math.radians(v))), np.float32(math.sin(math.radians(v)))
        return cx + c * dx - s * dy, cy + s * dx + c * dy
    if kind == "scale":
        return cx + dx / np.float32(v), cy + dy / np.float32(v)
    if kind == "shear":
        return xs - np.float32(v) * dy, ys
    rng = np.random.default_rng(perturbation_seed(key, perturbation.seed))
    grid = (max(2, math.ceil((height - 1) / perturbation.spacing) + 1),
            max(2, math.ceil((width - 1) / perturbation.spacing) + 1))
    nodes = torch.from_numpy(rng.standard_normal((1, 2) + grid) * v).float()
    field = F.interpolate(nodes, size=(height, width), mode="bicubic", align_corners=True)[0].numpy()
    return xs + field[0], ys + field[1]
