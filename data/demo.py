"""A small generated stand-in for ADE20K, so the whole pipeline runs on a CPU in minutes.

The files use the ADEChallengeData2016 layout and ADE20K ids (0 = other), so the demo goes
through exactly the code path of the real dataset. Each scene is an indoor (wall over floor) or
outdoor (sky over grass) backdrop with 2-5 objects (tree, person, car, painting) drawn as
textured cartoon shapes under a random scale, rotation, shear and aspect ratio, plus a few
unlabelled "other" blobs. The whole scene then gets a global affine transform and an elastic
warp (Simard et al., 2003: a smooth random displacement field), applied to image (bilinear) and
label (nearest) together. Colour and texture alone do not decide the class (clothes and cars take
random colours, trees and grass are both green), so shape matters: the deformable-convolution
comparison has something to learn.

Training generates it on first use (``ensure_demo_dataset``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from configs import UserError

# ADE20K ids (1-based, as stored in the annotation PNGs).
WALL, SKY, FLOOR, TREE, GRASS, PERSON, CAR, PAINTING = 1, 3, 4, 5, 10, 13, 21, 23
DEMO_CLASSES = {
    WALL: "wall", SKY: "sky", FLOOR: "floor", TREE: "tree",
    GRASS: "grass", PERSON: "person", CAR: "car", PAINTING: "painting",
}
OUTDOOR_OBJECTS = (TREE, TREE, PERSON, CAR)
INDOOR_OBJECTS = (PERSON, PAINTING, PAINTING)
CLOTHES = ((200, 40, 40), (40, 60, 170), (230, 200, 50), (30, 140, 60), (240, 240, 240), (120, 50, 150),
           (250, 130, 30), (40, 40, 40))
CAR_COLOURS = ((190, 20, 20), (20, 50, 160), (230, 230, 230), (240, 190, 20), (150, 155, 160), (20, 20, 20))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency noise: a ``cells`` x ``cells`` random grid upsampled bicubically to size x size."""
    grid = rng.normal(0.0, amplitude, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.BICUBIC))


class _Canvas:
    """An RGB float image and its ADE-id label, painted shape by shape."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.image = np.zeros((size, size, 3), np.float32)
        self.label = np.zeros((size, size), np.uint8)
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def paint(self, mask: np.ndarray, class_id: int, colour: tuple[float, ...] | np.ndarray,
              grain: float = 8.0, blotch: float = 0.0) -> None:
        """Fill ``mask`` with ``colour`` plus per-pixel grain and low-frequency blotches."""
        texture = np.asarray(colour, np.float32) + self.rng.normal(0.0, grain, (int(mask.sum()), 1))
        if blotch:
            texture = texture + _smooth_noise(self.rng, self.size, 6, blotch)[mask][:, None]
        self.image[mask] = texture
        self.label[mask] = class_id

    def local_coords(self, cx: float, cy: float, half: float, aspect: float,
                     angle: float, shear: float) -> tuple[np.ndarray, np.ndarray]:
        """Object coordinates (u, v) of every pixel: the object spans [-1, 1]^2 before its transform."""
        cos, sin = np.cos(angle), np.sin(angle)
        forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
        forward = forward @ np.diag([half * aspect, half])
        inverse = np.linalg.inv(forward).astype(np.float32)
        dx, dy = self.xx - cx, self.yy - cy
        return inverse[0, 0] * dx + inverse[0, 1] * dy, inverse[1, 0] * dx + inverse[1, 1] * dy


def _backdrop(canvas: _Canvas, indoor: bool) -> None:
    """Wall over floor, or sky over grass, split at a wavy horizon."""
    rng, s = canvas.rng, canvas.size
    horizon = s * rng.uniform(0.5, 0.75) if indoor else s * rng.uniform(0.3, 0.6)
    wave = rng.uniform(0, 0.06 * s) * np.sin(canvas.xx / s * rng.uniform(2, 8) + rng.uniform(0, 6.3))
    top = canvas.yy < horizon + wave
    if indoor:
        wall = rng.uniform(150, 235, 3)
        canvas.paint(top, WALL, wall, grain=4, blotch=6)
        wood = np.array([120, 80, 45]) * rng.uniform(0.7, 1.3)
        stripes = 18 * np.sin(canvas.yy * rng.uniform(0.8, 1.6))[..., None]
        floor = ~top
        canvas.paint(floor, FLOOR, wood, grain=10)
        canvas.image[floor] += stripes[floor]
    else:
        gradient = (canvas.yy / s)[..., None] * np.array([90, 60, 10], np.float32)
        canvas.paint(top, SKY, (60, 120, 215), grain=3)
        clouds = np.clip(_smooth_noise(rng, s, 5, 1.0) - 0.5, 0, None)[..., None] * 160
        canvas.image[top] += (gradient + clouds)[top]
        canvas.paint(~top, GRASS, np.array([70, 150, 50]) * rng.uniform(0.75, 1.2), grain=22)


def _tree(canvas: _Canvas, u: np.ndarray, v: np.ndarray) -> None:
    rng = canvas.rng
    trunk = (np.abs(u) < 0.14) & (v > -0.1) & (v < 1.0)
    canvas.paint(trunk, TREE, np.array([95, 65, 35]) * rng.uniform(0.8, 1.2), grain=10)
    crown = ((u / 0.8) ** 2 + ((v + 0.35) / 0.62) ** 2) < 1
    for _ in range(3):
        cu, cv, r = rng.uniform(-0.6, 0.6), rng.uniform(-0.8, -0.1), rng.uniform(0.25, 0.4)
        crown |= ((u - cu) ** 2 + (v - cv) ** 2) < r**2
    canvas.paint(crown, TREE, np.array([35, 105, 35]) * rng.uniform(0.7, 1.3), grain=12, blotch=30)


def _person(canvas: _Canvas, u: np.ndarray, v: np.ndarray) -> None:
    rng = canvas.rng
    legs = (v > 0.1) & (v < 1.0) & (np.abs(u) > 0.05) & (np.abs(u) < 0.3)
    canvas.paint(legs, PERSON, np.array(CLOTHES[rng.integers(len(CLOTHES))]) * 0.6, grain=8)
    torso = ((u / 0.36) ** 2 + ((v + 0.22) / 0.42) ** 2 < 1) | ((np.abs(u) < 0.3) & (v > -0.35) & (v < 0.15))
    arms = (np.abs(np.abs(u) - 0.42) < 0.08) & (v > -0.45) & (v < 0.2)
    canvas.paint(torso | arms, PERSON, CLOTHES[rng.integers(len(CLOTHES))], grain=8)
    head = (u**2 + (v + 0.78) ** 2) < 0.2**2
    canvas.paint(head, PERSON, np.array([225, 180, 140]) * rng.uniform(0.55, 1.1), grain=5)


def _car(canvas: _Canvas, u: np.ndarray, v: np.ndarray) -> None:
    rng = canvas.rng
    body = (np.abs(u) < 1.0) & (v > -0.15) & (v < 0.55)
    cabin = (v > -0.65) & (v <= -0.15) & (u > -0.55 - 0.4 * (v + 0.15)) & (u < 0.5 + 0.4 * (v + 0.15))
    canvas.paint(body | cabin, CAR, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], grain=6)
    windows = (v > -0.55) & (v < -0.2) & (np.abs(u + 0.02) < 0.4 + 0.35 * (v + 0.2)) & (np.abs(u + 0.02) > 0.04)
    canvas.paint(windows & cabin, CAR, (150, 190, 215), grain=6)
    wheels = ((np.abs(u) - 0.6) ** 2 + (v - 0.55) ** 2) < 0.27**2
    canvas.paint(wheels, CAR, (25, 25, 25), grain=4)


def _painting(canvas: _Canvas, u: np.ndarray, v: np.ndarray) -> None:
    rng = canvas.rng
    frame = (np.abs(u) < 1) & (np.abs(v) < 1)
    canvas.paint(frame, PAINTING, np.array([160, 120, 40]) * rng.uniform(0.6, 1.2), grain=6)
    inner = (np.abs(u) < 0.78) & (np.abs(v) < 0.78)
    a, b = rng.uniform(30, 240, 3), rng.uniform(30, 240, 3)
    mix = np.clip((u + v) / 2 + 0.5, 0, 1)[..., None]
    canvas.paint(inner, PAINTING, (0, 0, 0), grain=6)
    canvas.image[inner] += (a * mix + b * (1 - mix))[inner]


DRAW: dict[int, Callable[[_Canvas, np.ndarray, np.ndarray], None]] = {
    TREE: _tree, PERSON: _person, CAR: _car, PAINTING: _painting,
}
ASPECT = {TREE: (0.6, 0.9), PERSON: (0.5, 0.7), CAR: (1.5, 2.1), PAINTING: (0.8, 1.5), 0: (0.5, 2.0)}
HALF_SIZE = {TREE: (0.12, 0.3), PERSON: (0.15, 0.32), CAR: (0.1, 0.22), PAINTING: (0.1, 0.25), 0: (0.05, 0.14)}


def _objects(canvas: _Canvas, indoor: bool) -> None:
    """2-5 objects, far (higher up) first so nearer ones occlude them, plus 0-2 unlabelled blobs."""
    rng, s = canvas.rng, canvas.size
    kinds = INDOOR_OBJECTS if indoor else OUTDOOR_OBJECTS
    placed = []
    for _ in range(int(rng.integers(2, 6))):
        kind = kinds[rng.integers(len(kinds))]
        cy = s * (rng.uniform(0.15, 0.5) if kind == PAINTING else rng.uniform(0.4, 0.85))
        placed.append((cy, kind))
    for _ in range(int(rng.integers(0, 3))):
        placed.append((s * rng.uniform(0.2, 0.95), 0))
    for cy, kind in sorted(placed, key=lambda item: item[0]):
        half, aspect = s * rng.uniform(*HALF_SIZE[kind]), rng.uniform(*ASPECT[kind])
        u, v = canvas.local_coords(
            s * rng.uniform(0.1, 0.9), cy, half, aspect, rng.uniform(-0.45, 0.45), rng.uniform(-0.5, 0.5)
        )
        if kind == 0:  # clutter ADE would call "other": a grey blob
            blob = (u**2 + v**2) < 1 + 0.3 * np.sin(4 * np.arctan2(v, u))
            canvas.paint(blob, 0, rng.uniform(60, 200) * np.ones(3), grain=10)
        else:
            DRAW[kind](canvas, u, v)


def _warp(canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Global affine (rotation, shear, zoom) plus an elastic field; bilinear image, nearest label."""
    rng, s = canvas.rng, canvas.size
    angle, shear, zoom = rng.uniform(-0.3, 0.3), rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.15)
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) / zoom
    cx = cy = (s - 1) / 2
    dx, dy = canvas.xx - cx, canvas.yy - cy
    strength = s * rng.uniform(0.02, 0.06)
    xs = matrix[0, 0] * dx + matrix[0, 1] * dy + cx + _smooth_noise(rng, s, 5, strength)
    ys = matrix[1, 0] * dx + matrix[1, 1] * dy + cy + _smooth_noise(rng, s, 5, strength)

    def reflect(coords: np.ndarray) -> np.ndarray:
        period = 2 * (s - 1)
        coords = np.mod(coords, period)
        return np.clip(np.where(coords > s - 1, period - coords, coords), 0, s - 1)

    xs, ys = reflect(xs), reflect(ys)
    label = canvas.label[np.rint(ys).astype(int), np.rint(xs).astype(int)]
    x0, y0 = np.minimum(np.floor(xs).astype(int), s - 2), np.minimum(np.floor(ys).astype(int), s - 2)
    wx, wy = (xs - x0)[..., None], (ys - y0)[..., None]
    img = canvas.image
    image = (img[y0, x0] * (1 - wx) * (1 - wy) + img[y0, x0 + 1] * wx * (1 - wy)
             + img[y0 + 1, x0] * (1 - wx) * wy + img[y0 + 1, x0 + 1] * wx * wy)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One demo scene: (size x size x 3 uint8 RGB image, size x size uint8 ADE-id label)."""
    canvas = _Canvas(size, rng)
    indoor = rng.random() < 0.4
    _backdrop(canvas, indoor)
    _objects(canvas, indoor)
    return _warp(canvas)


README = """Generated demo dataset (not ADE20K).

Made by data/demo.py (generate_demo_dataset, num_train={num_train}, num_val={num_val}, size={size},
seed={seed}). It follows the ADEChallengeData2016 layout: images/{{training,validation}}/*.jpg
and annotations/{{training,validation}}/*.png holding ADE20K class ids (0 = other), so it is read
by exactly the same code as the real dataset. Classes used (ADE id: name): {classes}.
Delete this folder to regenerate it.
"""


def generate_demo_dataset(root: Path, num_train: int = 400, num_val: int = 40, size: int = 96, seed: int = 0) -> None:
    """Write the demo dataset to ``root`` (which must not exist or be empty); deterministic in ``seed``.

    The files are written to a temporary sibling folder that is renamed to ``root`` at the end, so an
    interrupted run never leaves a half-written dataset.
    """
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(
            f"cannot generate the demo dataset at {root}: it already exists and is not empty. Delete it "
            f"or set data.root to a new folder."
        )
    tmp = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        for split_id, (split, prefix, count) in enumerate(
            (("training", "ADE_train", num_train), ("validation", "ADE_val", num_val))
        ):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            for i in range(count):
                image, label = render_scene(np.random.default_rng([seed, split_id, i]), size)
                name = f"{prefix}_{i + 1:08d}"
                Image.fromarray(image, "RGB").save(tmp / "images" / split / f"{name}.jpg", quality=95)
                Image.fromarray(label, "L").save(tmp / "annotations" / split / f"{name}.png")
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(DEMO_CLASSES.items()))
        (tmp / "README.txt").write_text(
            README.format(num_train=num_train, num_val=num_val, size=size, seed=seed, classes=classes), encoding="utf-8"
        )
        if root.is_dir():
            root.rmdir()  # empty, checked above
        os.rename(tmp, root)
    except OSError as err:
        if (root / "images" / "training").is_dir():  # another process finished the same job first
            return
        raise UserError(
            f"cannot generate the demo dataset at {root.absolute()} ({err.strerror or err}). Set data.root to a folder "
            f"you can write to, with a few MB free (a relative data.root is relative to the working directory)."
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_dataset(root: Path) -> Path:
    """Generate the demo dataset at ``root`` unless ``root/images/training`` exists; return ``root``."""
    if not (root / "images" / "training").is_dir():
        print(f"generating the demo dataset at {root} (first use, a few seconds)", flush=True)
        try:
            generate_demo_dataset(root)
        except UserError:
            if not (root / "images" / "training").is_dir():  # not just another process finishing first
                raise
    return root
