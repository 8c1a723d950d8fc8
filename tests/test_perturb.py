"""data/perturb.py: image/label alignment, identity, determinism, outside pixels, conventions and the parser."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data import IGNORE_INDEX
from data.perturb import (
    HELP,
    KINDS,
    MEAN_FILL,
    Perturbation,
    parse_perturbation,
    source_coordinates,
)

PALETTE = np.random.default_rng(0).integers(0, 256, size=(256, 3)).astype(np.uint8)


def coloured_pair(height: int = 96, width: int = 128, seed: int = 1) -> tuple[Image.Image, np.ndarray]:
    """Blocky label map (classes 0..149, some 255) and an image whose colour at each pixel is PALETTE[label]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 150, size=(height // 16 + 1, width // 16 + 1))
    coarse[rng.random(coarse.shape) < 0.1] = IGNORE_INDEX
    label = np.kron(coarse, np.ones((16, 16), np.int64))[:height, :width].astype(np.uint8)
    return Image.fromarray(PALETTE[label], "RGB"), label


def interior(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one label (not at a class border or the image edge)."""
    h, w = label.shape
    out = np.zeros((h, w), bool)
    out[radius:h - radius, radius:w - radius] = True
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = label[radius + dy:h - radius + dy, radius + dx:w - radius + dx]
            out[radius:h - radius, radius:w - radius] &= shifted == label[radius:h - radius, radius:w - radius]
    return out


def same_class_taps(label: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Output pixels whose four bilinear source taps are in the image and hold one class."""
    h, w = label.shape
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    ok = (x0 >= 0) & (x0 + 1 < w) & (y0 >= 0) & (y0 + 1 < h)
    x0, y0 = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
    taps = [label[y0 + a, x0 + b] for a in (0, 1) for b in (0, 1)]
    return ok & (taps[0] == taps[1]) & (taps[0] == taps[2]) & (taps[0] == taps[3])


@pytest.mark.parametrize(
    "text", ["rotate=30", "rotate=-75", "scale=0.5", "scale=1.6", "shear=0.3", "shear=-1", "elastic=6:24", "elastic=12"]
)
def test_image_and_label_stay_aligned(text: str) -> None:
    image, label = coloured_pair()
    p = parse_perturbation(text)
    out_image, out_label = p(image, label, key="ADE_val_00000001")
    assert isinstance(out_image, Image.Image) and out_image.mode == "RGB" and out_image.size == image.size
    assert out_label.dtype == np.uint8 and out_label.shape == label.shape
    assert not np.array_equal(out_label, label)  # it did move
    pixels = np.asarray(out_image).astype(int)
    labelled = out_label != IGNORE_INDEX
    # Every labelled pixel whose bilinear taps lie in one source class has that class's colour ...
    checks = [labelled & same_class_taps(label, *source_coordinates(p, *label.shape, key="ADE_val_00000001"))]
    if p.kind != "elastic":  # ... and, for the affine kinds, every one away from class borders in the output
        checks.append(labelled & interior(out_label))
    for check in checks:
        assert check.sum() > 500
        assert np.abs(pixels[check] - PALETTE[out_label[check]].astype(int)).max() <= 1


@pytest.mark.parametrize("text", ["rotate=0", "scale=1", "shear=0", "elastic=0", "elastic=0:8"])
def test_identity_is_exact(text: str) -> None:
    image, label = coloured_pair()
    noisy = Image.fromarray(np.random.default_rng(2).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    for img in (image, noisy):
        out_image, out_label = parse_perturbation(text)(img, label, key=3)
        assert out_image.tobytes() == img.tobytes() and out_image.mode == "RGB"
        assert np.array_equal(out_label, label) and out_label.dtype == label.dtype and out_label is not label


def test_deterministic_per_image_and_seed() -> None:
    image, label = coloured_pair()
    p = parse_perturbation("elastic=4:16", seed=0)
    a = p(image, label, key="ADE_val_00000007")
    b = parse_perturbation("elastic=4:16", seed=0)(image, label, key="ADE_val_00000007")
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    other_image = p(image, label, key="ADE_val_00000008")
    other_seed = parse_perturbation("elastic=4:16", seed=1)(image, label, key="ADE_val_00000007")
    assert not np.array_equal(a[1], other_image[1]) and not np.array_equal(a[1], other_seed[1])
    # geometric kinds do not depend on the key
    r = parse_perturbation("rotate=10")
    assert np.array_equal(r(image, label, key=0)[1], r(image, label, key=99)[1])


def test_outside_pixels_are_ignored_and_filled() -> None:
    image, label = coloured_pair()
    label[label == IGNORE_INDEX] = 7  # fully labelled input: every 255 in the output comes from outside
    for text in ("scale=0.5", "rotate=45", "shear=0.5", "elastic=4:16"):
        out_image, out_label = parse_perturbation(text)(image, label, key=0)
        xs, ys = source_coordinates(parse_perturbation(text), *label.shape, key=0)
        outside = (xs < -0.5) | (xs >= label.shape[1] - 0.5) | (ys < -0.5) | (ys >= label.shape[0] - 0.5)
        assert outside.any() and np.array_equal(out_label == IGNORE_INDEX, outside), text
        assert (np.asarray(out_image)[outside] == MEAN_FILL).all()
    # scale 0.5 on 96x128: the content fills the central 48x64, the rest is outside
    out_label = parse_perturbation("scale=0.5")(image, label)[1]
    assert (out_label[:23] == IGNORE_INDEX).all() and (out_label[:, :31] == IGNORE_INDEX).all()
    assert (out_label[25:71, 33:95] != IGNORE_INDEX).all()


def test_conventions_rotation_scale_shear() -> None:
    rng = np.random.default_rng(3)
    square = rng.integers(0, 150, size=(33, 33)).astype(np.uint8)
    image = Image.fromarray(PALETTE[square], "RGB")
    out_image, out_label = parse_perturbation("rotate=90")(image, square)
    assert np.array_equal(out_label, np.rot90(square))  # counter-clockwise as displayed
    assert np.abs(np.asarray(out_image).astype(int) - PALETTE[np.rot90(square)]).max() <= 1
    # scale 2 about the centre (odd size: the centre is a pixel): output (y, x) reads ((y-16)/2+16, (x-16)/2+16)
    zoom = parse_perturbation("scale=2")(image, square)[1]
    assert zoom[16, 16] == square[16, 16] and zoom[20, 24] == square[18, 20] and zoom[0, 0] == square[8, 8]
    # shear k: row y moves right by k * (y - 16)
    sheared = parse_perturbation("shear=0.25")(image, square)[1]
    assert np.array_equal(sheared[16], square[16]) and np.array_equal(sheared[32, 4:], square[32, :-4])
    assert (sheared[32, :4] == IGNORE_INDEX).all()


def test_elastic_field_is_smooth_with_the_given_amplitude() -> None:
    p = parse_perturbation("elastic=5", seed=4)
    xs, ys = source_coordinates(p, 256, 320, key="a")
    grid_y, grid_x = np.mgrid[0:256, 0:320]
    dx, dy = xs - grid_x, ys - grid_y
    rms = float(np.sqrt((dx**2 + dy**2).mean() / 2))
    assert 2.5 < rms < 6.0
    assert np.diff(xs, axis=1).min() > 0 and np.diff(ys, axis=0).min() > 0  # smooth enough not to fold


@pytest.mark.parametrize(
    "text", ["rotate", "twist=3", "scale=abc", "scale=0", "scale=-1", "elastic=-2", "rotate=nan", "", "=5",
             "rotate=1:2", "elastic=3:0", "shear="]
)
def test_parser_errors(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_perturbation(text)
    message = str(info.value)
    assert "\n" not in message and repr(text) in message and ", ".join(KINDS) in message


def test_parser_values() -> None:
    assert parse_perturbation("rotate=15") == Perturbation("rotate", 15.0)
    assert parse_perturbation(" Scale = 0.75 ") == Perturbation("scale", 0.75)
    e = parse_perturbation("elastic=8:32", seed=5)
    assert (e.kind, e.value, e.spacing, e.seed) == ("elastic", 8.0, 32.0, 5) and str(e) == "elastic=8:32"
    assert str(parse_perturbation("elastic=8")) == "elastic=8" and str(parse_perturbation("shear=-0.2")) == "shear=-0.2"


@pytest.mark.parametrize("text,why", [
    ("scale=1e9", "scale must be between 0.25 and 4, got 1e+09"), ("scale=0.2", "between 0.25 and 4"),
    ("rotate=181", "rotate must be between -180 and 180"), ("rotate=-400", "between -180 and 180"),
    ("shear=1.5", "shear must be between -1 and 1"), ("elastic=17", "amplitude between 0 and 16 pixels"),
    ("elastic=5:16", "amplitude between 0 and 4 pixels"), ("elastic=1:4", "spacing must be between 8 and 256"),
    ("elastic=8:1e9", "spacing must be between 8 and 256 pixels, got 1e+09"),
])
def test_values_outside_the_stated_ranges_are_refused(text: str, why: str) -> None:
    """Issue 23, item 8: scale=1e9 ran and reported an mIoU; every kind has a range, stated in HELP (--help)."""
    with pytest.raises(ValueError, match=why.replace("+", r"\+")):
        parse_perturbation(text)
    for edge in ("scale=0.25", "scale=4", "rotate=-180", "rotate=180", "shear=-1", "shear=1", "elastic=16",
                 "elastic=2:8", "elastic=64:256"):
        parse_perturbation(edge)
    for stated in ("rotate=DEGREES (-180 to 180)", "scale=FACTOR (0.25 to 4)", "shear=FACTOR (-1 to 1",
                   "(0 to GRID/4 pixels; GRID 8 to 256 pixels, default 64)"):
        assert stated in HELP


def test_help_states_the_ranges_and_compare_refuses_at_once(tmp_path, capsys) -> None:
    import evaluate
    from scripts import compare

    for parse in (evaluate.parse_args, compare.parse_args):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert " ".join(HELP.split()) in text
    # refused before any run is read (the folder does not even exist) or evaluated
    assert compare.main([str(tmp_path / "no-run"), "--perturb", "rotate=15", "scale=1e9"]) == 2
    err = capsys.readouterr().err
    assert "bad perturbation 'scale=1e9'" in err and "no-run" not in err and "Traceback" not in err
