"""Offset tracing (engine/offsets.py), the figure (engine/offset_figure.py) and scripts/visualize_offsets.py."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import engine.offset_figure as figure
import engine.offsets as offsets_lib
from configs import load_config
from models.deform_conv import DeformConv2d
from models.segmentor import build_model, deformable_layers
from scripts import visualize_offsets as cli


def sampling_locations(model: nn.Module, image: torch.Tensor, points: list[tuple[float, float]],
                       num_layers: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per output position of the last traced layer: (locations (9^L, 2) as (x, y) in the input grid of the first
    traced layer, weights (9^L,)), as the figure traces them."""
    _, fields = offsets_lib.run_with_fields(model, image)
    fields = fields[-offsets_lib.check_num_layers(num_layers, [f.name for f in fields]) :]
    return [offsets_lib.trace(fields, p)[-1] for p in points]

REPO = Path(__file__).resolve().parents[1]

DEMO = ["model.pretrained_backbone=false", "data.scale=[64,64]"]  # small inputs keep the CPU forward passes short
LAYER4 = [f"backbone.layer4.{i}.conv2" for i in range(3)]
GRID3 = [(kx - 1, ky - 1) for ky in range(3) for kx in range(3)]  # row-major taps as (x, y) unit steps


pytestmark = pytest.mark.usefixtures("one_thread")


def demo_model(overrides: list[str] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model, _ = build_model(load_config("demo.yaml", DEMO + (overrides or [])))
    return model.eval()


@pytest.fixture(scope="module")
def v2_model() -> nn.Module:
    return demo_model()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 24, 32)  # layer4 grid 3x4: small, to keep the CPU forward passes short


def composed_grid(point: tuple[int, int], dilations: list[int]) -> np.ndarray:
    """p + sum of the dilated 3x3 grids, last layer outermost (the documented order of the 9^L rows)."""
    rows = []
    for taps in itertools.product(GRID3, repeat=len(dilations)):
        # taps[0] belongs to the last layer, taps[-1] to the first traced one
        x = point[0] + sum(d * t[0] for d, t in zip(reversed(dilations), taps))
        y = point[1] + sum(d * t[1] for d, t in zip(reversed(dilations), taps))
        rows.append((x, y))
    return np.array(rows, dtype=np.float64)


def set_offset_bias(layer: DeformConv2d, dx: float = 0.0, dy: float = 0.0, mask: float | None = None) -> None:
    """Make a layer predict constant offsets (dy, dx) for every tap and, for v2, the mask value ``mask``."""
    taps = layer.weight.shape[-2] * layer.weight.shape[-1] * layer.deform_groups
    with torch.no_grad():
        bias = layer.offset_conv.bias
        bias.zero_()
        bias[0 : 2 * taps : 2] = dy  # channel 2k: y offset of tap k
        bias[1 : 2 * taps : 2] = dx  # channel 2k + 1: x offset of tap k
        if mask is not None:
            bias[2 * taps :] = math.log(mask / (1 - mask))


# ------------------------------------------------------------------------------------------- tracing
def test_zero_offsets_give_the_composed_dilated_grids(v2_model: nn.Module, image: torch.Tensor) -> None:
    layers = deformable_layers(v2_model)
    assert list(layers) == LAYER4 and [layers[n].dilation[0] for n in LAYER4] == [2, 4, 4]
    point = (2, 1)
    p = np.array(point, dtype=np.float64)
    (one, w1), = sampling_locations(v2_model, image, [point], num_layers=1)
    expected = np.array([p + 4 * np.array(t) for t in GRID3])
    assert one.shape == (9, 2) and np.array_equal(one, expected)
    two, w2 = sampling_locations(v2_model, image, [point], num_layers=2)[0]
    assert two.shape == (81, 2) and np.array_equal(two, composed_grid(point, [4, 4]))
    three, w3 = sampling_locations(v2_model, image, [point], num_layers=3)[0]
    assert three.shape == (729, 2) and np.array_equal(three, composed_grid(point, [2, 4, 4]))
    # a fresh v2 mask is sigmoid(0) = 0.5 in every layer
    for weights, depth in ((w1, 1), (w2, 2), (w3, 3)):
        assert weights.shape == (9**depth,) and np.allclose(weights, 0.5**depth)


def test_several_points_and_default_depth(v2_model: nn.Module, image: torch.Tensor) -> None:
    points = [(0, 0), (3, 2), (2, 1)]
    results = sampling_locations(v2_model, image, points)
    assert len(results) == 3
    for point, (locations, _) in zip(points, results):
        assert np.array_equal(locations, composed_grid(point, [2, 4, 4]))  # also beyond the border


def test_constant_x_offset_shifts_one_pixel_per_layer(image: torch.Tensor) -> None:
    model = demo_model()
    layers = deformable_layers(model)
    point = (3, 1)
    set_offset_bias(layers["backbone.layer4.1.conv2"], dx=1.0)
    locations, _ = sampling_locations(model, image, [point], num_layers=3)[0]
    shift = locations - composed_grid(point, [2, 4, 4])
    assert np.allclose(shift[:, 0], 1.0, atol=1e-9) and np.allclose(shift[:, 1], 0.0, atol=1e-9)
    for name in LAYER4:
        set_offset_bias(layers[name], dx=1.0)
    for depth in (1, 2, 3):
        locations, _ = sampling_locations(model, image, [point], num_layers=depth)[0]
        shift = locations - composed_grid(point, [2, 4, 4][-depth:])
        assert np.allclose(shift[:, 0], depth, atol=1e-9) and np.allclose(shift[:, 1], 0.0, atol=1e-9)
    set_offset_bias(layers["backbone.layer4.2.conv2"], dy=-2.0)
    locations, _ = sampling_locations(model, image, [point], num_layers=1)[0]
    assert np.allclose(locations - composed_grid(point, [4]), [[0.0, -2.0]] * 9, atol=1e-9)


def test_mask_weights_are_products_along_the_path(image: torch.Tensor) -> None:
    model = demo_model()
    for name in LAYER4:
        set_offset_bias(deformable_layers(model)[name], mask=0.8)
    for depth in (1, 2, 3):
        _, weights = sampling_locations(model, image, [(1, 2)], num_layers=depth)[0]
        assert np.allclose(weights, 0.8**depth, rtol=1e-6)
    set_offset_bias(deformable_layers(model)["backbone.layer4.0.conv2"], mask=0.25)
    _, weights = sampling_locations(model, image, [(1, 2)], num_layers=3)[0]
    assert np.allclose(weights, 0.8 * 0.8 * 0.25, rtol=1e-6)


def test_v1_weights_are_ones_and_strided_layer_geometry(image: torch.Tensor) -> None:
    model = demo_model(["model.deform.version=1", "model.deform.stages=[layer2]", "model.deform.blocks=[0]"])
    layer = deformable_layers(model)["backbone.layer2.0.conv2"]
    assert layer.stride == (2, 2) and layer.dilation == (1, 1)
    locations, weights = sampling_locations(model, image, [(3, 2)])[0]  # layer2 output grid 3x4
    expected = np.array([(2 * 3 + tx, 2 * 2 + ty) for tx, ty in GRID3], dtype=np.float64)
    assert np.array_equal(locations, expected) and np.array_equal(weights, np.ones(9))


def test_deformable_groups_are_averaged(image: torch.Tensor) -> None:
    model = demo_model(["model.deform.groups=4"])
    layer = deformable_layers(model)["backbone.layer4.2.conv2"]
    with torch.no_grad():
        layer.offset_conv.bias[1:18:2] = 2.0  # x offsets of group 0 only; channel 2 * (g * 9 + k) + 1
    locations, _ = sampling_locations(model, image, [(1, 1)], num_layers=1)[0]
    assert np.allclose(locations - composed_grid((1, 1), [4]), [[0.5, 0.0]] * 9, atol=1e-9)


class OneLayer(nn.Module):
    """A single deformable layer whose output reads back, per tap, the sampled x, y and mask."""

    def __init__(self, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv = DeformConv2d(4, 27, (3, 3), (stride, stride), (dilation, dilation), (dilation, dilation), version=2)
        with torch.no_grad():
            self.conv.weight.zero_()
            for k in range(9):
                ky, kx = divmod(k, 3)
                self.conv.weight[3 * k, 0, ky, kx] = 1.0  # x ramp
                self.conv.weight[3 * k + 1, 1, ky, kx] = 1.0  # y ramp
                self.conv.weight[3 * k + 2, 2, ky, kx] = 1.0  # ones
            self.conv.offset_conv.weight.zero_()
            self.conv.offset_conv.weight[:, 3].normal_(0.0, 0.6, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


@pytest.mark.parametrize("stride, dilation", [(1, 1), (1, 2), (2, 1), (2, 3)])
def test_locations_match_what_torchvision_samples(stride: int, dilation: int) -> None:
    """Against the op itself: bilinear sampling of coordinate ramps returns the sampled coordinates."""
    h, w = 13, 17
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    noise = torch.randn(h, w, generator=torch.Generator().manual_seed(1))
    x = torch.stack([xs, ys, torch.ones(h, w), noise])
    model = OneLayer(stride, dilation)
    with torch.no_grad():
        out = model(x[None])["out"][0].double().numpy()
    offsets, _ = model.conv.offsets_and_mask(x[None])
    assert offsets.abs().max() > 0.5  # the offsets really are non-trivial
    out_h, out_w = out.shape[-2:]
    points = [(px, py) for py in range(out_h) for px in range(out_w)]
    results = sampling_locations(model, x, points)
    checked = 0
    for (px, py), (locations, weights) in zip(points, results):
        mask = out[2::3, py, px]
        x_in = (locations[:, 0] >= 0) & (locations[:, 0] <= w - 1)
        inside = x_in & (locations[:, 1] >= 0) & (locations[:, 1] <= h - 1)  # where all bilinear corners are real
        assert np.allclose(weights[inside], mask[inside], atol=1e-5)
        assert np.allclose(locations[inside, 0], out[0::3, py, px][inside] / mask[inside], atol=1e-4)
        assert np.allclose(locations[inside, 1], out[1::3, py, px][inside] / mask[inside], atol=1e-4)
        checked += int(inside.sum())
    assert checked > 0.5 * 9 * len(points)


def test_choose_points_spreads_over_classes() -> None:
    pred = np.zeros((24, 32), np.int64)  # background class 0
    pred[12:, :] = 3  # floor-like lower half
    pred[4:11, 20:29] = 7  # an object
    pred[14:21, 3:9] = 9  # another object
    points = offsets_lib.choose_points(pred, n=4)
    assert len(points) == 4 and len(set(points)) == 4
    assert {int(pred[y, x]) for x, y in points} == {0, 3, 7, 9}
    for x, y in points:
        assert 2 <= x <= 29 and 2 <= y <= 21  # away from the border
    assert len(offsets_lib.choose_points(np.zeros((12, 12), np.int64), n=5)) == 5  # one class: filled up


def synthetic_fields(h: int, w: int, scale: float, seed: int = 0) -> list:
    """Three layer4-like fields (dilations 2, 4, 4; stride 8) on an h x w grid with smooth random offsets."""
    g = torch.Generator().manual_seed(seed)
    fields = []
    for i, d in enumerate((2, 4, 4)):
        coarse = torch.randn(1, 18, 3, 4, generator=g, dtype=torch.float64) * scale
        offsets = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")[0].reshape(9, 2, h, w).numpy()
        fields.append(offsets_lib.LayerField(
            name=f"layer4.{i}.conv2", version=1, groups=1, offsets=offsets, mask=None,
            magnitude=np.linalg.norm(offsets, axis=1).mean(0), kernel=(3, 3), stride=(1, 1), padding=(d, d),
            dilation=(d, d), in_stride=8.0, out_stride=8.0,
        ))
    return fields


def zoom_boxes(orig_w: int, orig_h: int, net_w: int, net_h: int, scale: float,
               feats: list[tuple[int, int]]) -> tuple[list, list, tuple, tuple]:
    """The point panels' views as offset_figure computes them, with each point's image-pixel locations."""
    fields = synthetic_fields(net_h // 8, net_w // 8, scale)
    geo = figure._Geometry(orig_w, orig_h, net_w, net_h)
    image_box = (-0.5, orig_w - 0.5, orig_h - 0.5, -0.5)
    traces = [offsets_lib.trace(fields, p) for p in feats]
    canvas = figure._cloud_view(geo, fields, traces, image_box)
    clouds = [np.vstack([geo.to_image(t[-1][0], 8.0), geo.to_image(np.array(p, float), 8.0)])
              for p, t in zip(feats, traces)]
    return [figure._zoom_view(xy, image_box, canvas) for xy in clouds], clouds, image_box, canvas


def test_zoom_box_holds_its_locations_within_the_padded_canvas() -> None:
    """On a photo-sized image each point panel zooms to its 729 locations, padded only where they go."""
    feats = [(0, 0), (2, 45), (32, 24), (63, 47), (63, 3), (15, 38)]  # corners, border, centre (grid 48x64)
    zooms, clouds, image_box, canvas = zoom_boxes(1024, 768, 512, 384, scale=1.0, feats=feats)
    left, right, bottom, top = image_box
    img_w, img_h = right - left, bottom - top
    zoomed = 0
    for (b_left, b_right, b_bottom, b_top), xy in zip(zooms, clouds):
        assert len(xy) == 9**3 + 1
        # holds every location and the output position, with a margin
        assert b_left < xy[:, 0].min() and b_right > xy[:, 0].max()
        assert b_top < xy[:, 1].min() and b_bottom > xy[:, 1].max()
        # the image's aspect ratio, at least a quarter of its shorter side, and smaller than the image
        width, height = b_right - b_left, b_bottom - b_top
        assert math.isclose(width / height, img_w / img_h, rel_tol=1e-9)
        assert height >= 0.25 * img_h - 1e-9 and width < img_w
        # within the padded canvas: the image, and the padding only as far as this point's locations reach
        spread = (xy.max(0) - xy.min(0)).max()
        assert b_left >= min(left, xy[:, 0].min() - 0.15 * spread) - 1e-9
        assert b_right <= max(right, xy[:, 0].max() + 0.15 * spread) + 1e-9
        assert b_top >= min(top, xy[:, 1].min() - 0.15 * spread) - 1e-9
        assert b_bottom <= max(bottom, xy[:, 1].max() + 0.15 * spread) + 1e-9
        assert b_left >= left - figure.MAX_PADDING * img_w and b_right <= right + figure.MAX_PADDING * img_w
        assert b_top >= top - figure.MAX_PADDING * img_h and b_bottom <= bottom + figure.MAX_PADDING * img_h
        zoomed += int(xy[:, 0].min() >= left and xy[:, 0].max() <= right)
    assert zoomed >= 2  # some clouds lie inside the image: their boxes show no padding at all
    inside = [z for z, xy in zip(zooms, clouds) if xy[:, 0].min() >= left and xy[:, 0].max() <= right
              and xy[:, 1].min() >= top and xy[:, 1].max() <= bottom]
    for box in inside:
        assert box[0] >= left and box[1] <= right and box[3] >= top and box[2] <= bottom


def test_zoom_keeps_the_widened_view_when_the_spread_exceeds_the_image() -> None:
    """The 96-pixel demo: the locations reach far beyond the image, so the panels keep the shared widened view."""
    zooms, clouds, image_box, canvas = zoom_boxes(96, 96, 96, 96, scale=0.5, feats=[(0, 0), (5, 6), (11, 2)])
    assert all(z == canvas for z in zooms)
    assert canvas[0] < image_box[0] and canvas[1] > image_box[1]  # the padding around the image


def test_tiny_spreads_are_not_blown_up() -> None:
    image_box = (-0.5, 683.5, 511.5, -0.5)
    xy = np.array([[300.0, 200.0], [302.0, 201.0], [301.0, 203.0]])
    left, right, bottom, top = figure._zoom_view(xy, image_box, image_box)
    assert math.isclose(bottom - top, 0.25 * 512) and math.isclose(right - left, 0.25 * 684)
    assert left < 300 < 302 < right and top < 200 < 203 < bottom
    near_corner = figure._zoom_view(xy - [298.0, 198.0], image_box, image_box)  # moved inside the image, not shrunk
    assert near_corner[0] == -0.5 and near_corner[3] == -0.5 and math.isclose(near_corner[1], -0.5 + 0.25 * 684)


# --------------------------------------------------------------------------------------- command line
def photo(path: Path, width: int = 120, height: int = 90) -> Path:
    """A small photo-like image: sky gradient, textured ground, a house and a tree, with noise."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), np.float32)
    sky = ys < 0.55 * height
    img[sky] = np.stack([110 + 60 * ys / height, 160 + 40 * ys / height, 230 * np.ones_like(ys)], -1)[sky]
    img[~sky] = np.stack([70 + 20 * np.sin(xs / 3.0), 120 + 15 * np.cos(ys / 2.0), 50 + 0 * xs], -1)[~sky]
    house = (xs > 15) & (xs < 60) & (ys > 30) & (ys < 62)
    img[house] = (170, 150, 120)
    roof = (ys <= 30) & (30 - ys < (25 - np.abs(xs - 37.5)) * 0.6)
    img[roof] = (140, 60, 50)
    tree = (xs - 92) ** 2 + (ys - 35) ** 2 < 15**2
    img[tree] = (40, 100, 40)
    img += rng.normal(0, 8, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def save_checkpoint(path: Path, version: int) -> Path:
    config = load_config("demo.yaml", DEMO + [f"model.deform.version={version}"])
    torch.manual_seed(0)
    model, _ = build_model(config)
    if version:
        g = torch.Generator().manual_seed(0)
        for layer in deformable_layers(model).values():
            with torch.no_grad():
                layer.offset_conv.weight.normal_(0.0, 1e-3, generator=g)
                layer.offset_conv.bias.normal_(0.0, 0.5, generator=g)
    torch.save({"model": model.state_dict(), "config": config, "iteration": 0, "best_miou": 0.0}, path)
    return path


@pytest.fixture(scope="module")
def files(module_dir: Path) -> dict[str, Path]:
    root = module_dir
    return {
        "v2": save_checkpoint(root / "v2.pt", 2),
        "v0": save_checkpoint(root / "v0.pt", 0),
        "image": photo(root / "photo.png"),
        "root": root,
    }


def test_script_writes_a_png(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = files["root"] / "figs" / "auto.png"
    code = cli.main(["--checkpoint", str(files["v2"]), "--image", str(files["image"]), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 600
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 20  # not a blank canvas
    out2 = files["root"] / "points.png"
    code = cli.main(["--checkpoint", str(files["v2"]), "--image", str(files["image"]), "--out", str(out2),
                    "--points", "10,10", "60,45", "119,89", "--layers", "2"])
    assert code == 0, capsys.readouterr().err
    assert out2.is_file()


def test_offset_figure_returns_an_rgb_image(files: dict[str, Path]) -> None:
    from data.transforms import ValTransform

    config = load_config("demo.yaml", DEMO)
    model = demo_model()
    rgb = np.asarray(Image.open(files["image"]).convert("RGB"))
    tensor = ValTransform(config["data"])(Image.fromarray(rgb))
    model.train()
    fig = figure.offset_figure(model, tensor, rgb, points=[(30, 40)], iteration=7)
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    assert model.training  # the caller's mode is restored


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--points", "10;20"], "10;20"),
        (["--points", "10,20,30"], "10,20,30"),
        (["--points", "120,10"], "outside the image"),
        (["--points", "5,-1"], "outside the image"),
        (["--layers", "7"], "--layers 7"),
    ],
)
def test_bad_input_exits_2(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = files["root"] / "bad.png"
    code = cli.main(["--checkpoint", str(files["v2"]), "--image", str(files["image"]), "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_missing_or_unreadable_image_exits_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    broken = files["root"] / "broken.jpg"
    broken.write_text("not an image")
    for path in (files["root"] / "missing.jpg", broken):
        code = cli.main(["--checkpoint", str(files["v2"]), "--image", str(path), "--out", str(files["root"] / "x.png")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and str(path) in err


def test_plain_checkpoint_exits_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = files["root"] / "plain.png"
    code = cli.main(["--checkpoint", str(files["v0"]), "--image", str(files["image"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "this checkpoint has no deformable layers" in err and "Traceback" not in err
    assert not out.exists()


def test_an_unwritable_out_is_refused_before_the_model_runs(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--out under a file: refused before the checkpoint is read; --out a folder: refused at the write, no traceback."""
    monkeypatch.setattr(cli, "load_checkpoint", lambda path: pytest.fail("the checkpoint was read"))
    blocker = files["root"] / "blocker"
    blocker.write_text("")
    code = cli.main(["--checkpoint", str(files["v2"]), "--image", str(files["image"]), "--out", str(blocker / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: cannot write to {blocker}") and "nothing was drawn" in err
    monkeypatch.undo()
    folder = files["root"] / "a_folder"
    folder.mkdir()
    code = cli.main(["--checkpoint", str(files["v2"]), "--image", str(files["image"]), "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: could not write {folder}") and err.count("\n") == 1
