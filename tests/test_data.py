"""Tests of the data pipeline: label mapping, paired transforms, the resumable sampler, loaders,
the layout check and the generated demo dataset. Every dataset is a tiny tree made in tmp_path."""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest
import scipy.stats
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import data.dataset as dataset_module
import data.demo as demo_module
from configs import UserError, load_config
from data import IGNORE_INDEX
from data.dataset import (
    SegmentationFolder,
    TrainSampler,
    build_train_loader,
    build_val_loader,
    check_layout,
    list_split,
    load_class_info,
    prepare_dataset_root,
    read_rgb,
    sample_seed,
)
from data.demo import DEMO_CLASSES, ensure_demo_dataset, generate_demo_dataset
from data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainTransform,
    ValTransform,
    denormalize,
    map_ade_labels,
    normalize_batch,
    photometric_distortion,
    scale_saturation,
    shift_hue,
)

# Far-apart colours so a bilinear blend is only ambiguous right at a block boundary.
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)


def _data_cfg(**changes) -> dict:
    dcfg = {"scale": [160, 120], "ratio_range": [0.5, 1.5], "crop_size": 64, "cat_max_ratio": 0.75,
            "photometric": False, "resize_filter": "antialias"}
    dcfg.update(changes)
    return dcfg


def _val_cfg(scale: list[int], resize_filter: str = "antialias") -> dict:
    return {"scale": scale, "resize_filter": resize_filter}


def _colour_coded_pair(seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A 160x120 image of 40x40 blocks whose colour encodes the block's label (0..5, no 255)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(COLOURS), (3, 4))
    label = np.kron(blocks, np.ones((40, 40), np.int64)).astype(np.uint8)
    return Image.fromarray(COLOURS[label], "RGB"), label


def _config(root: Path, **data) -> dict:
    overrides = [f"data.root={root}", "data.dataset=ade20k", "data.num_workers=0", "train.batch_size=4"]
    config = load_config("demo", overrides)
    config["data"].update(data)
    return config


# ---------------------------------------------------------------- labels and class info


def test_map_ade_labels() -> None:
    raw = np.array([[0, 1, 2], [75, 149, 150]], np.uint8)
    mapped = map_ade_labels(raw)
    assert mapped.dtype == np.uint8
    assert mapped.tolist() == [[IGNORE_INDEX, 0, 1], [74, 148, 149]]


def test_load_class_info() -> None:
    names, palette = load_class_info()
    assert len(names) == 150 and names[0] == "wall" and names[12] == "person" and names[149] == "flag"
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 150


# ---------------------------------------------------------------- transforms


def test_train_transform_keeps_image_and_label_aligned() -> None:
    image, label = _colour_coded_pair()
    agree = total = padded_samples = 0
    for resize_filter in ("antialias", "bilinear"):
        transform = TrainTransform(_data_cfg(resize_filter=resize_filter))
        for seed in range(40):
            raw_image, out_label, crop = transform(image, label, np.random.default_rng(seed))
            assert raw_image.shape == (3, 64, 64) and raw_image.dtype == torch.uint8
            assert out_label.shape == (64, 64) and out_label.dtype == torch.uint8
            assert crop.shape == (2,) and crop.dtype == torch.int64
            out_image = normalize_batch(raw_image[None], crop[None])[0]
            assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
            valid = (out_label != IGNORE_INDEX).numpy()
            rows, cols = valid.any(1).sum(), valid.any(0).sum()
            assert valid[:rows, :cols].all() and not valid[rows:].any() and not valid[:, cols:].any()
            assert crop.tolist() == [rows, cols]
            padded_samples += rows < 64 or cols < 64
            assert (out_image[:, ~torch.from_numpy(valid)] == 0).all()  # padding is 0 after normalisation
            assert (raw_image[:, ~torch.from_numpy(valid)] == 0).all()  # and 0 before it
            pixels = denormalize(out_image).astype(np.int64)
            distance = ((pixels[:, :, None, :] - COLOURS[None, None].astype(np.int64)) ** 2).sum(-1)
            decoded = distance.argmin(-1)
            agree += (decoded[valid] == out_label.numpy()[valid]).sum()
            total += valid.sum()
    assert padded_samples > 0  # ratio 0.5 shrinks the image below the crop
    assert agree / total > 0.97


def test_val_transform_fits_scale_and_denormalize_round_trips() -> None:
    image, _ = _colour_coded_pair()  # 160x120
    out = ValTransform(_val_cfg([80, 80]))(image)
    assert out.shape == (3, 60, 80)  # factor min(80/160, 80/120) = 0.5
    up = ValTransform(_val_cfg([320, 320]))(image)
    assert up.shape == (3, 240, 320)  # keep-ratio resize may upscale
    same = ValTransform(_val_cfg([160, 120]))(image)
    assert np.abs(denormalize(same).astype(int) - np.asarray(image).astype(int)).max() <= 1


# ---------------------------------------------------------------- the recipe's statistics
# Seeded draws through the public transform, measured on images built so that each quantity can be read back:
# ramps whose red and green give a sample's source position, labels that name their source column or row,
# colours whose HSV value, chroma and hue show each photometric step.

_RAMP_W, _RAMP_H = 96, 88


def _training_rngs(count: int) -> list[np.random.Generator]:
    """The generators of a training run's first ``count`` samples (seed 0)."""
    return [np.random.default_rng(sample_seed(0, position)) for position in range(count)]


def _ramp_pair(label_axis: str = "x") -> tuple[torch.Tensor, np.ndarray]:
    """A 96x88 image with red = 2x + 2 and green = 2y + 2 (x, y: pixel indices); its label names x or y as
    37 x mod 150 (neighbours get far-apart ids, so that any blend of two labels shows)."""
    y, x = np.mgrid[0:_RAMP_H, 0:_RAMP_W]
    image = torch.from_numpy(np.stack([2 * x + 2, 2 * y + 2, np.full_like(x, 128)]).astype(np.uint8))
    return image, (37 * (x if label_axis == "x" else y) % 150).astype(np.uint8)


_COORDINATE_OF_LABEL = np.full(256, -1)
_COORDINATE_OF_LABEL[37 * np.arange(_RAMP_W) % 150] = np.arange(_RAMP_W)


def _sample_positions(ramp: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """Source positions (in pixels, edge coordinates: pixel k spans [k, k + 1)) of a crop's samples along one axis,
    from a ramp profile ``2 k + 2`` (a line fitted away from the source borders, where the filters clamp), and
    whether the axis is mirrored."""
    position = (ramp - 2) / 2 + 0.5  # pixel index k sits at k + 0.5
    index = np.arange(len(ramp))
    keep = np.ones(len(ramp), bool)
    for _ in range(2):
        slope, intercept = np.polyfit(index[keep], position[keep], 1)
        fitted = intercept + slope * index
        margin = 1.5 * max(1.0, abs(slope)) + 1
        keep = (fitted > margin) & (fitted < size - margin)
    return fitted, slope < 0


def test_rescale_crop_and_flip_follow_the_recipe() -> None:
    """Ratio ~ U(0.5, 2.0), crop offsets ~ uniform over the rescaled image, flip with probability 0.5."""
    image, label = _ramp_pair()
    transform = TrainTransform(_data_cfg(scale=[128, 128], ratio_range=[0.5, 2.0], crop_size=40, cat_max_ratio=1.0))
    ratios, lefts, tops, flips = [], [], [], []
    for rng in _training_rngs(400):
        out, _, valid = transform(image, label, rng)
        assert valid.tolist() == [40, 40]  # the rescaled image (at least 64x59) always holds the crop
        x, flipped = _sample_positions(out[0, 0].numpy().astype(float), _RAMP_W)
        y, _ = _sample_positions(out[1, :, 0].numpy().astype(float), _RAMP_H)
        x = x[::-1] if flipped else x
        factor = 1 / (x[1] - x[0])  # rescaled pixels per source pixel: 128 r / 96 (the long side)
        ratios.append(factor * 96 / 128)
        width, height = 96 * factor, 88 * factor
        lefts.append((x[0] - (x[1] - x[0]) / 2) * factor / (width - 40))  # crop offset / its range
        tops.append((y[0] - (y[1] - y[0]) / 2) * factor / (height - 40))
        flips.append(flipped)
    assert scipy.stats.kstest(ratios, scipy.stats.uniform(0.5, 1.5).cdf).pvalue > 1e-3
    assert 0.49 < min(ratios) and max(ratios) < 2.05
    for offsets in (lefts, tops):
        assert scipy.stats.kstest(offsets, scipy.stats.uniform(0, 1).cdf).pvalue > 1e-3
        assert -0.05 < min(offsets) and max(offsets) < 1.05
    assert abs(np.mean(flips) - 0.5) < 0.1


def test_labels_are_the_nearest_neighbour_on_the_image_grid() -> None:
    """Every label pixel is the source label at the image's sample point (either neighbour within 0.15 pixel of
    a boundary), along both axes, for both filters, flipped or not, shrinking or growing."""
    checked = 0
    for axis, channel, size in (("x", 0, _RAMP_W), ("y", 1, _RAMP_H)):
        image, label = _ramp_pair(axis)
        for resize_filter in ("antialias", "bilinear"):
            transform = TrainTransform(_data_cfg(scale=[128, 128], ratio_range=[0.5, 2.0], crop_size=40,
                                                 resize_filter=resize_filter))
            for seed, rng in enumerate(_training_rngs(60)):
                out, out_label, _ = transform(image, label, rng)
                if axis == "y":  # read the columns as rows
                    out, out_label = out.transpose(1, 2), out_label.T
                assert (out_label == out_label[:1]).all()  # each label names its source column (row) alone
                position, _ = _sample_positions(out[channel, 0].numpy().astype(float), size)
                source = _COORDINATE_OF_LABEL[out_label[0].numpy()]
                inside = (position > 2) & (position < size - 2)
                clear = inside & (np.abs(position - np.round(position)) > 0.15)
                assert np.array_equal(source[clear], np.floor(position[clear]).astype(int)), (axis, seed)
                near = inside & ~clear
                assert np.all(np.abs(source[near] + 0.5 - position[near]) < 0.65), (axis, seed)
                checked += clear.sum()
    assert checked > 5000


def test_cat_max_ratio_redraws_as_mmseg() -> None:
    """A crop is acceptable with probability q; mmseg checks up to 10 draws and keeps the 11th: 1 - (1 - q)^11.

    Columns 0..29 are ignored (255), 30..83 class 0, 84..99 class 1: a 40-wide crop at offset L (0..60) holds
    two labelled classes with neither over 75% only for L >= 55 (ignored pixels counted as a class would also
    accept L = 1..19, whose crops hold no class 1).
    """
    label = np.zeros((60, 100), np.uint8)
    label[:, :30], label[:, 84:] = IGNORE_INDEX, 1
    image = torch.zeros((3, 60, 100), dtype=torch.uint8)
    q = 6 / 61
    for cat_max_ratio, expected in ((0.75, 1 - (1 - q) ** 11), (1.0, q)):
        transform = TrainTransform(_data_cfg(scale=[100, 60], ratio_range=[1.0, 1.0], crop_size=40,
                                             cat_max_ratio=cat_max_ratio))
        accepted = []
        for rng in _training_rngs(400):
            crop = transform(image, label, rng)[1].numpy()
            accepted.append((crop == 1).sum() > 10 * 40)  # L >= 55
        assert abs(np.mean(accepted) - expected) < 0.07, (cat_max_ratio, np.mean(accepted), expected)


def _hsv(image: torch.Tensor) -> np.ndarray:
    """[3, h, w] uint8 RGB -> [h * w, 3] HSV: hue in degrees, saturation 0..1, value 0..255."""
    hsv = matplotlib.colors.rgb_to_hsv(image.permute(1, 2, 0).numpy().reshape(-1, 3) / 255.0)
    return hsv * [360.0, 1.0, 255.0]


def test_photometric_distortion_follows_the_recipe() -> None:
    """Over seeded draws, each step's measured change has the recipe's probability and distribution:
    brightness + U(-32, 32), contrast x U(0.5, 1.5), saturation x U(0.5, 1.5), hue + 2 k degrees for k in -18..17.

    The colours are chosen so that no step clips: the value V = max channel then goes through brightness and
    contrast alone (V_out = a V + b with a = contrast, b = a x brightness), the chroma (max - min channel) through
    contrast and saturation (x a s), and the hue through the hue step alone.
    """
    rng = np.random.default_rng(0)
    hsv = np.stack([rng.uniform(0, 1, 1024), rng.uniform(0.2, 0.5, 1024), rng.uniform(90, 110, 1024) / 255], -1)
    rgb = np.rint(matplotlib.colors.hsv_to_rgb(hsv) * 255).astype(np.uint8)
    image = torch.from_numpy(rgb.reshape(32, 32, 3)).permute(2, 0, 1).contiguous()
    before = _hsv(image)
    contrast, brightness, saturation, hue = [], [], [], []
    for rng in _training_rngs(400):
        after = _hsv(photometric_distortion(image, rng))
        a, b = np.polyfit(before[:, 2], after[:, 2], 1)
        contrast.append(a)
        brightness.append(b / a + 0.5 * (1 + 1 / a))  # the two truncations to integers cost 0.5 each on average
        chroma = np.median(after[:, 1] * after[:, 2] / (before[:, 1] * before[:, 2]))
        saturation.append(chroma / a)
        turn = np.angle(np.mean(np.exp(1j * np.deg2rad(after[:, 0] - before[:, 0]))), deg=True)
        hue.append(turn)
    uniform = scipy.stats.uniform
    for values, spread, low, high in ((contrast, 0.02, 0.5, 1.5), (saturation, 0.03, 0.5, 1.5),
                                      (brightness, 1.5, -32, 32)):
        neutral = 0.0 if low < 0 else 1.0
        changed = np.array(values)[np.abs(np.array(values) - neutral) > spread]
        expected_share = 0.5 * (1 - 2 * spread / (high - low))
        assert abs(len(changed) / len(values) - expected_share) < 0.08, (low, high, len(changed))
        assert scipy.stats.kstest(changed, uniform(low, high - low).cdf).pvalue > 1e-3, (low, high)
    turned = np.array(hue)[np.abs(hue) > 1]
    assert abs(len(turned) / len(hue) - 0.5 * 35 / 36) < 0.08
    assert np.abs(turned / 2 - np.round(turned / 2)).max() < 0.25  # whole OpenCV hue units of 2 degrees
    assert -36.5 < turned.min() and turned.max() < 34.5
    assert abs(turned.mean() + 1) < 4 and abs(turned.std() - 2 * np.sqrt((36**2 - 1) / 12)) < 3


def test_hue_and_saturation_steps_match_hsv_references() -> None:
    """shift_hue against torchvision's adjust_hue, scale_saturation against matplotlib's HSV round trip, on every
    kind of colour (greys, black, white, saturated ones, where the saturation caps at 1)."""
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (3, 48, 64)).astype(np.uint8))
    image[:, :8] = torch.from_numpy(rng.integers(0, 4, (3, 8, 64)) * 85).to(torch.uint8)
    for degrees in (-36, -12, 2, 20, 34):
        ours = shift_hue(image.float(), degrees).to(torch.uint8)
        reference = TF.adjust_hue(image, degrees / 360)
        assert (ours.int() - reference.int()).abs().max() <= 1, degrees
    rgb = image.permute(1, 2, 0).numpy() / 255.0
    for factor in (0.5, 0.9, 1.3, 1.5):
        hsv = matplotlib.colors.rgb_to_hsv(rgb)
        hsv[..., 1] = np.minimum(hsv[..., 1] * factor, 1.0)
        reference = np.rint(matplotlib.colors.hsv_to_rgb(hsv) * 255).astype(int)
        ours = scale_saturation(image.float(), factor).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(ours - reference).max() <= 1, factor
    assert torch.equal(photometric_distortion(image, np.random.default_rng(5)),
                       photometric_distortion(image, np.random.default_rng(5)))


def test_photometric_distortion_changes_colours_only() -> None:
    image, label = _colour_coded_pair()
    pixels = TF.pil_to_tensor(image)
    assert any(not torch.equal(photometric_distortion(pixels, np.random.default_rng(s)), pixels) for s in range(8))
    transform = TrainTransform(_data_cfg(photometric=True))
    off = TrainTransform(_data_cfg(photometric=False))
    for seed in range(5):
        _, with_label, with_crop = transform(image, label, np.random.default_rng(seed))
        _, without_label, without_crop = off(image, label, np.random.default_rng(seed))
        assert torch.equal(with_label, without_label)  # photometric draws come after the geometry
        assert torch.equal(with_crop, without_crop)


# ---------------------------------------------------------------- filters and normalisation


def _opencv_linear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) semantics in float64: half-pixel centres, edge pixel repeated, no antialiasing."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        low = np.floor(position).astype(np.int64)
        weight = position - low
        weight[low < 0], low[low < 0] = 0.0, 0
        weight[low >= n_in - 1], low[low >= n_in - 1] = 0.0, n_in - 1
        return low, np.minimum(low + 1, n_in - 1), weight

    y0, y1, wy = axis(pixels.shape[0], size[1])
    x0, x1, wx = axis(pixels.shape[1], size[0])
    p = pixels.astype(np.float64)
    rows = p[y0] * (1 - wy)[:, None, None] + p[y1] * wy[:, None, None]
    out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return np.floor(out + 0.5)


def _test_image(width: int = 97, height: int = 71, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise and a few hard edges: every resampling error shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    base += rng.normal(0, 20, base.shape)
    base[height // 3 : height // 2, width // 4 :] = [250, 10, 40]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def test_bilinear_filter_has_opencv_semantics_and_antialias_is_pil() -> None:
    image = _test_image(seed=2)  # 97x71
    pixels = np.asarray(image)
    for scale in ([33, 33], [60, 60], [150, 150], [300, 300]):
        size = (scale[0], int(71 * scale[0] / 97 + 0.5))
        bilinear = denormalize(ValTransform(_val_cfg(scale, "bilinear"))(image)).astype(int)
        assert np.abs(bilinear - _opencv_linear(pixels, size)).max() <= 1, scale
        antialias = denormalize(ValTransform(_val_cfg(scale))(image)).astype(int)
        assert np.abs(antialias - np.asarray(image.resize(size, Image.BILINEAR)).astype(int)).max() <= 1, scale
    shrunk = [denormalize(ValTransform(_val_cfg([33, 33], f))(image)).astype(float) for f in ("antialias", "bilinear")]
    assert np.abs(shrunk[0] - shrunk[1]).mean() > 2  # shrinking: antialiasing is a different filter


def test_normalize_batch_layouts_and_padding() -> None:
    images = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8)
    valid = torch.tensor([[20, 30], [10, 30], [5, 7]])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    plain = (images.float() - mean) / std
    assert torch.equal(normalize_batch(images), plain)
    out = normalize_batch(images, valid)
    for i, (height, width) in enumerate(valid.tolist()):
        expected = torch.zeros_like(plain[i])
        expected[:, :height, :width] = plain[i, :, :height, :width]
        assert torch.equal(out[i], expected)
    channels_last = normalize_batch(images.contiguous(memory_format=torch.channels_last), valid)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and torch.equal(channels_last, out)


# ---------------------------------------------------------------- dataset


def test_val_dataset_returns_original_size_label(make_ade_tree) -> None:
    root = make_ade_tree()
    dataset = SegmentationFolder(root, "validation", ValTransform(_val_cfg([80, 64])))
    assert len(dataset) == 2
    image, label, name = dataset[1]
    assert image.shape == (3, 60, 80)  # 40x30 resized by min(80/40, 64/30) = 2
    assert label.shape == (30, 40) and label.dtype == torch.int64
    raw = np.array(Image.open(root / "annotations" / "validation" / "ADE_val_00000002.png"))
    assert name == "ADE_val_00000002"
    assert np.array_equal(label.numpy(), map_ade_labels(raw))


def test_max_images_keeps_the_first_files(make_ade_tree) -> None:
    dataset = SegmentationFolder(make_ade_tree(), "training", ValTransform(_val_cfg([40, 30])), max_images=2)
    assert [dataset[i][2] for i in range(len(dataset))] == ["ADE_train_00000001", "ADE_train_00000002"]


def test_train_samples_are_pure_functions_of_the_key(make_ade_tree) -> None:
    dataset = SegmentationFolder(make_ade_tree(), "training", TrainTransform(_data_cfg(photometric=True)))
    first = dataset[(0, 123)]
    np.random.seed(7)
    torch.manual_seed(7)  # the global RNGs play no part
    second = dataset[(0, 123)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(first[2], second[2])
    others = [dataset[(0, seed)] for seed in range(1, 4)]
    assert any(not torch.equal(first[1], other[1]) for other in others)
    assert any(not torch.equal(first[0], other[0]) for other in others)


def test_training_decoders_give_the_pixels_pil_gives(make_ade_tree) -> None:
    root = make_ade_tree()
    dataset = SegmentationFolder(root, "training", TrainTransform(_data_cfg(photometric=True)))
    for index in range(len(dataset)):
        fast, label = dataset._load(index, pixels=True)
        slow, slow_label = dataset._load(index)
        assert isinstance(fast, torch.Tensor) and fast.shape == (3, 30, 40) and fast.dtype == torch.uint8
        assert np.array_equal(fast.permute(1, 2, 0).numpy(), np.asarray(slow)) and np.array_equal(label, slow_label)
        sample = dataset[(index, 77)]
        reference = dataset.transform(slow, slow_label, np.random.default_rng(77))
        assert all(torch.equal(a, b) for a, b in zip(sample, reference))
    grey = root / "images" / "training" / "ADE_train_00000001.jpg"  # a greyscale JPEG goes through PIL
    Image.fromarray(np.full((30, 40), 90, np.uint8), "L").save(grey)
    image, _ = dataset._load(0, pixels=True)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.getpixel((0, 0)) == (90, 90, 90)


def test_dataset_errors_name_the_file(make_ade_tree) -> None:
    root = make_ade_tree()
    with pytest.raises(UserError, match="no images found"):
        SegmentationFolder(root, "testing", ValTransform(_val_cfg([40, 30])))
    bad = root / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.fromarray(np.full((30, 40), 200, np.uint8), "L").save(bad)
    dataset = SegmentationFolder(root, "validation", ValTransform(_val_cfg([40, 30])))
    with pytest.raises(UserError, match="ADE_val_00000001.png.*200"):
        dataset[0]
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(UserError, match="ADE_train_00000002.jpg"):
        SegmentationFolder(root, "training", ValTransform(_val_cfg([40, 30])))


def test_upper_case_and_long_extensions_are_listed_for_training_evaluation_and_check(make_ade_tree) -> None:
    """Issue 23, item 1: X.JPG and X.jpeg with X.png (and X.PNG) are pairs like X.jpg/X.png, in training, evaluation
    and --check alike (one listing, ``list_split``); before, evaluation counted 2 of 3 images and exited 0."""
    root = make_ade_tree(num_train=3, num_val=3)
    val_images, val_labels = root / "images" / "validation", root / "annotations" / "validation"
    (val_images / "ADE_val_00000001.jpg").rename(val_images / "ADE_val_00000001.JPG")
    (val_images / "ADE_val_00000002.jpg").rename(val_images / "ADE_val_00000002.jpeg")
    (val_labels / "ADE_val_00000003.png").rename(val_labels / "ADE_val_00000003.PNG")
    train_images = root / "images" / "training"
    (train_images / "ADE_train_00000002.jpg").rename(train_images / "ADE_train_00000002.Jpeg")
    dataset = SegmentationFolder(root, "validation", ValTransform(_val_cfg([40, 30])))
    assert [dataset[i][2] for i in range(len(dataset))] == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    training = SegmentationFolder(root, "training", TrainTransform(_data_cfg()))
    assert len(training) == 3 and isinstance(training._load(1, pixels=True)[0], torch.Tensor)  # the JPEG decoder
    problems, report = check_layout(root)
    assert problems == []
    assert "validation: 3 images, 3 annotations" in report and "training: 3 images, 3 annotations" in report


def test_files_that_do_not_pair_are_refused_not_dropped(make_ade_tree) -> None:
    """Two files of one stem, a file of another type and an annotation without its image are named, by the dataset
    (training and evaluation refuse to start) and by --check; before, all three were silently left out."""
    root = make_ade_tree()
    images, labels = root / "images" / "validation", root / "annotations" / "validation"
    (images / "ADE_val_00000001.JPG").write_bytes((images / "ADE_val_00000001.jpg").read_bytes())
    (images / "ADE_val_00000002.png").write_bytes((labels / "ADE_val_00000002.png").read_bytes())
    (labels / "ADE_val_00000009.png").write_bytes((labels / "ADE_val_00000002.png").read_bytes())
    expected = [
        f"{images / 'ADE_val_00000001.JPG'} and {images / 'ADE_val_00000001.jpg'}: two images named ADE_val_00000001; "
        f"keep one of them",
        f"{images / 'ADE_val_00000002.png'}: not an image file (.jpg or .jpeg, any case); move it out of {images}",
        f"{labels / 'ADE_val_00000009.png'}: annotation without an image {images / 'ADE_val_00000009'}.jpg (or .jpeg)",
    ]
    pairs, problems = list_split(root, "validation")
    assert problems == expected and len(pairs) == 3
    for transform in (ValTransform(_val_cfg([40, 30])), TrainTransform(_data_cfg())):
        with pytest.raises(UserError) as info:
            SegmentationFolder(root, "validation", transform)
        assert all(problem in str(info.value) for problem in expected) and "3 problem(s)" in str(info.value)
    assert check_layout(root)[0] == expected
    SegmentationFolder(root, "training", ValTransform(_val_cfg([40, 30])))  # the other split is fine


def test_read_rgb_scales_16_bit_and_refuses_unknown_ranges(tmp_path: Path) -> None:
    """Issue 23, item 3: a 16-bit greyscale PNG (PIL mode I;16) becomes 8 bits by v / 257, not white; 32-bit integer
    and float pixels are refused naming the file; EXIF orientation only on request (the dataset reads stored pixels)."""
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535: exactly 0..255 in 8 bits
    ramp[0, 1] = 385  # 1.498 -> 1
    ramp[0, 2] = 643  # 2.502 -> 3
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    pixels = np.asarray(read_rgb(tmp_path / "grey16.png"))
    expected = np.arange(256).reshape(16, 16)
    expected[0, 1:3] = [1, 3]
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3) and np.array_equal(pixels[..., 1], expected)
    for name, array in (("float.tif", np.zeros((4, 4), np.float32)), ("int32.tif", np.zeros((4, 4), np.int32))):
        Image.fromarray(array).save(tmp_path / name)
        with pytest.raises(UserError, match=f"{tmp_path / name} has .* pixels \\(PIL mode [IF]\\)"):
            read_rgb(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees: portrait
    Image.new("RGB", (48, 32), (200, 30, 30)).save(tmp_path / "phone.jpg", exif=exif)
    assert read_rgb(tmp_path / "phone.jpg").size == (48, 32)
    assert read_rgb(tmp_path / "phone.jpg", exif_orientation=True).size == (32, 48)


# ---------------------------------------------------------------- sampler


def _take(sampler: TrainSampler, iterations: int) -> list[list[tuple[int, int]]]:
    """The first ``iterations`` local batches of ``sampler``."""
    stream = iter(sampler)
    return [[next(stream) for _ in range(sampler.local_batch)] for _ in range(iterations)]


def test_sampler_resumes_exactly() -> None:
    full = _take(TrainSampler(7, 4, 0, 1, seed=3), 12)
    assert _take(TrainSampler(7, 4, 0, 1, seed=3, start_iter=5), 7) == full[5:]
    flat = [key for batch in full for key in batch]
    assert sorted(index for index, _ in flat[:7]) == list(range(7))  # each epoch is a permutation
    assert sorted(index for index, _ in flat[7:14]) == list(range(7))
    assert len({seed for _, seed in flat}) == len(flat) and all(0 <= s < 2**63 for _, s in flat)
    assert _take(TrainSampler(7, 4, 0, 1, seed=4), 12) != full


def test_sampler_rank_shards_partition_the_global_batch() -> None:
    single = _take(TrainSampler(10, 6, 0, 1, seed=0, start_iter=2), 5)
    shards = [_take(TrainSampler(10, 6, rank, 3, seed=0, start_iter=2), 5) for rank in range(3)]
    for it in range(5):
        assert shards[0][it] + shards[1][it] + shards[2][it] == single[it]


# ---------------------------------------------------------------- loaders and dataset root


def test_train_loader_batches_and_resumes(make_ade_tree) -> None:
    config = _config(make_ade_tree())
    loader = build_train_loader(config, rank=1, world_size=2, start_iter=0)
    batches = [batch for _, batch in zip(range(3), loader)]
    raw_images, labels, valid = batches[0]
    assert raw_images.shape == (2, 3, 64, 64) and raw_images.dtype == torch.uint8
    assert valid.shape == (2, 2) and valid.dtype == torch.int64
    images = normalize_batch(raw_images, valid)  # what training does on the device
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (2, 64, 64) and labels.dtype == torch.uint8  # .long() on the device for the loss
    resumed = next(iter(build_train_loader(config, rank=1, world_size=2, start_iter=2)))
    assert torch.equal(resumed[0], batches[2][0]) and torch.equal(resumed[1], batches[2][1])
    assert torch.equal(resumed[2], batches[2][2])


def test_train_loader_with_a_worker(make_ade_tree) -> None:
    config = _config(make_ade_tree(), num_workers=1)
    loader = build_train_loader(config, rank=0, world_size=1, start_iter=0)
    stream = iter(loader)
    images, labels, valid = next(stream)
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4, 64, 64) and valid.shape == (4, 2)
    del stream, loader  # shuts the persistent worker down


def test_val_loader_shards_without_duplicates(make_ade_tree) -> None:
    config = _config(make_ade_tree(num_val=5))
    seen = []
    for rank in range(2):
        for image, label, names in build_val_loader(config, "validation", rank, 2):
            assert image.shape[:2] == (1, 3) and label.shape == (1, 30, 40) and label.dtype == torch.int64
            seen.extend(names)
    assert sorted(seen) == [f"ADE_val_{i:08d}" for i in range(1, 6)]
    subset = build_val_loader(config, "training", 0, 1, max_images=2)
    assert [names[0] for _, _, names in subset] == ["ADE_train_00000001", "ADE_train_00000002"]


def test_missing_ade20k_root_explains_how_to_get_it(tmp_path: Path) -> None:
    config = _config(tmp_path / "nowhere" / "ADEChallengeData2016")
    with pytest.raises(UserError) as info:
        prepare_dataset_root(config)
    message = str(info.value)
    assert "images/{training,validation}/*.jpg" in message and "annotations/{training,validation}/*.png" in message
    assert "python scripts/download_ade20k.py --root data" in message
    assert "data.root=/path/to/ADEChallengeData2016" in message


def test_prepare_dataset_root_generates_the_demo_once(tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []

    def small(root: Path) -> None:
        calls.append(root)
        generate_demo_dataset(root, num_train=2, num_val=1, size=32)

    monkeypatch.setattr(demo_module, "generate_demo_dataset", small)
    config = _config(tmp_path / "demo", dataset="demo")
    root = prepare_dataset_root(config)
    assert (root / "images" / "training" / "ADE_train_00000002.jpg").is_file()
    assert "generating the demo dataset" in capsys.readouterr().out
    assert prepare_dataset_root(config) == root and len(calls) == 1


# ---------------------------------------------------------------- layout check


def test_check_layout_accepts_a_valid_tree(make_ade_tree) -> None:
    problems, report = check_layout(make_ade_tree())
    assert problems == []
    assert "training: 4 images, 4 annotations" in report
    assert any(line.startswith("WARNING: training has 4 images") for line in report)


def test_check_layout_collects_every_problem(make_ade_tree, monkeypatch) -> None:
    monkeypatch.setattr(dataset_module, "POOL_MIN_FILES", 0)  # exercise the process pool
    root = make_ade_tree()
    (root / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    Image.fromarray(np.full((30, 40), 200, np.uint8), "L").save(root / "annotations" / "training" / "ADE_train_00000002.png")
    jpg = root / "images" / "validation" / "ADE_val_00000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    problems, _ = check_layout(root, workers=2)
    text = "\n".join(problems)
    assert "ADE_train_00000001.jpg: no annotation" in text
    assert "ADE_train_00000002.png: label value 200" in text
    assert "ADE_val_00000002.jpg: cannot read" in text
    assert len(problems) == 3
    missing, _ = check_layout(root.parent / "absent")
    assert len(missing) == 1 and "absent" in missing[0]


# ---------------------------------------------------------------- demo dataset


def test_demo_generation_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    generate_demo_dataset(first, num_train=3, num_val=2, size=48, seed=1)
    generate_demo_dataset(second, num_train=3, num_val=2, size=48, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left
    for rel in ("images/training/ADE_train_00000003.jpg", "annotations/training/ADE_train_00000003.png",
                "images/validation/ADE_val_00000001.jpg", "annotations/validation/ADE_val_00000002.png"):
        assert (first / rel).read_bytes() == (second / rel).read_bytes()
    assert "demo" in (first / "README.txt").read_text().lower()
    ids = set()
    for png in first.glob("annotations/*/*.png"):
        ids |= set(np.unique(np.array(Image.open(png))).tolist())
    assert ids <= {0} | set(DEMO_CLASSES) and len(ids) >= 3
    problems, _ = check_layout(first)
    assert problems == []
    with pytest.raises(UserError, match="not empty"):
        generate_demo_dataset(first, num_train=1, num_val=1, size=32)
    assert ensure_demo_dataset(first) == first  # already there: nothing to do


def test_demo_generation_in_a_read_only_working_directory_is_one_paragraph(monkeypatch) -> None:
    """Issue 29, item 8: data.root=data/demo (relative) under a working directory nobody may write, root included:
    /sys (before: a PermissionError traceback from mkdir)."""
    monkeypatch.chdir("/sys")
    with pytest.raises(UserError, match=r"cannot generate the demo dataset at /sys/data/demo \(.+\)\. Set data\.root"):
        ensure_demo_dataset(Path("data/demo"))


# ---------------------------------------------------------------- labels the data and the model must agree on


def test_an_annotation_that_is_not_a_png_is_named_in_training_evaluation_and_check(make_ade_tree) -> None:
    """Issue 29, item 5: a JPEG saved under the .png name (its compression changes ids along every region edge) was
    read as labels by training and evaluation and passed --check; now each names the file."""
    root = make_ade_tree()
    for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        path = root / "annotations" / split / f"{stem}.png"
        Image.open(path).save(path, format="JPEG", quality=95)
    with pytest.raises(UserError, match="ADE_train_00000001.png is a JPEG file, not a PNG"):
        SegmentationFolder(root, "training", TrainTransform(_data_cfg()))[(0, 0)]
    with pytest.raises(UserError, match="ADE_val_00000001.png is a JPEG file, not a PNG"):
        SegmentationFolder(root, "validation", ValTransform(_val_cfg([40, 30])))[0]
    problems, _ = check_layout(root)
    assert sorted(p.split(": ")[0] for p in problems) == [str(root / "annotations" / split / f"{stem}.png") for split, stem
                                                          in (("training", "ADE_train_00000001"),
                                                              ("validation", "ADE_val_00000001"))]
    assert all("annotation is a JPEG file, not a PNG" in p for p in problems)


def test_a_label_the_model_has_no_class_for_names_the_file_the_value_and_the_key(make_ade_tree) -> None:
    """Issue 29, item 6: model.num_classes smaller than the labels in the data ended in the loss's or the metric's
    traceback; the label check names the file, the value and model.num_classes (ids 1..N are classes 0..N-1)."""
    root = make_ade_tree()  # ids up to 150
    config = _config(root)
    config["model"]["num_classes"] = 20
    loader = build_val_loader(config, "validation", 0, 1)
    with pytest.raises(UserError, match=r"ADE_val_00000001.png holds the label value 150 \(class 149\), but "
                                        r"model.num_classes=20 allows the values 1..20"):
        next(iter(loader))
    config["model"]["num_classes"] = 150
    labels = next(iter(build_val_loader(config, "validation", 0, 1)))[1]
    assert labels[labels != IGNORE_INDEX].max() == 149


@pytest.mark.parametrize(("data", "val_size"), [({"scale": [1, 1]}, (1, 1)), ({"scale": [0.001, 0.001]}, (1, 1)),
                                               ({"ratio_range": [1e-6, 1e-6]}, (120, 160))])
def test_a_scale_or_ratio_too_small_for_a_pixel_gives_a_one_pixel_image(data: dict, val_size: tuple, make_ade_tree) -> None:
    """Issue 29, item 6: the config accepts any positive data.scale and data.ratio_range; where they rescale an image
    below one pixel (before: a ZeroDivisionError in the crop), training and evaluation take one pixel."""
    root = make_ade_tree()
    image, label, valid = SegmentationFolder(root, "training", TrainTransform(_data_cfg(**data)))[(0, 3)]
    assert image.shape == (3, 64, 64) and valid.tolist() == [1, 1] and (label[1:] == IGNORE_INDEX).all()
    resized, full_label, _ = SegmentationFolder(root, "validation", ValTransform(_val_cfg(_data_cfg(**data)["scale"])))[0]
    assert resized.shape[1:] == val_size and full_label.shape == (30, 40)
