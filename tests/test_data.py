"""Tests of the data pipeline: label mapping, paired transforms, the resumable sampler, loaders,
the layout check and the generated demo dataset. Every dataset is a tiny tree made in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
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
)
from data.demo import DEMO_CLASSES, ensure_demo_dataset, generate_demo_dataset
from data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainTransform,
    ValTransform,
    denormalize,
    map_ade_labels,
    nearest_indices,
    normalize_batch,
    photometric_distortion,
    resize_image,
    resize_region,
)

# Far-apart colours so a bilinear blend is only ambiguous right at a block boundary.
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)


def _data_cfg(**changes) -> dict:
    cfg = {"scale": [160, 120], "ratio_range": [0.5, 1.5], "crop_size": 64, "cat_max_ratio": 0.75,
           "photometric": False}
    cfg.update(changes)
    return cfg


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


def test_cat_max_ratio_is_honoured() -> None:
    label = np.zeros((200, 200), np.uint8)
    label[:, 150:] = 1  # class 0 covers 75% of the image
    label[:40, :40] = IGNORE_INDEX  # ignored pixels do not count
    image = Image.fromarray(COLOURS[np.minimum(label, 5)], "RGB")

    def satisfied(cat_max_ratio: float) -> float:
        transform = TrainTransform(_data_cfg(scale=[200, 200], ratio_range=[1.0, 1.0], cat_max_ratio=cat_max_ratio))
        hits = 0
        for seed in range(40):
            crop = transform(image, label, np.random.default_rng(seed))[1].numpy()
            counts = np.bincount(crop[crop != IGNORE_INDEX], minlength=2)
            counts = counts[counts > 0]
            hits += len(counts) > 1 and counts.max() / counts.sum() < 0.75
        return hits / 40

    assert satisfied(0.75) >= 0.85  # 11 draws, each acceptable with probability ~1/4
    assert satisfied(1.0) <= 0.5  # the check switched off


def test_photometric_distortion_changes_colours_only() -> None:
    image, label = _colour_coded_pair()
    pixels = np.asarray(image)
    changed = [not np.array_equal(photometric_distortion(pixels, np.random.default_rng(s)), pixels) for s in range(8)]
    assert any(changed)
    transform = TrainTransform(_data_cfg(photometric=True))
    off = TrainTransform(_data_cfg(photometric=False))
    for seed in range(5):
        _, with_label, with_crop = transform(image, label, np.random.default_rng(seed))
        _, without_label, without_crop = off(image, label, np.random.default_rng(seed))
        assert torch.equal(with_label, without_label)  # photometric draws come after the geometry
        assert torch.equal(with_crop, without_crop)


def test_val_transform_fits_scale_and_denormalize_round_trips() -> None:
    image, _ = _colour_coded_pair()  # 160x120
    out = ValTransform({"scale": [80, 80]})(image)
    assert out.shape == (3, 60, 80)  # factor min(80/160, 80/120) = 0.5
    up = ValTransform({"scale": [320, 320]})(image)
    assert up.shape == (3, 240, 320)  # keep-ratio resize may upscale
    same = ValTransform({"scale": [160, 120]})(image)
    assert np.abs(denormalize(same).astype(int) - np.asarray(image).astype(int)).max() <= 1


def test_bad_transform_config_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.scale"):
        TrainTransform(_data_cfg(scale=[512]))
    with pytest.raises(UserError, match="data.crop_size"):
        TrainTransform(_data_cfg(crop_size=0))
    with pytest.raises(UserError, match="data.resize_filter"):
        TrainTransform(_data_cfg(resize_filter="cubic"))


# ---------------------------------------------------------------- equivalence with the previous pipeline
# The references below are the previous implementation (whole-image PIL resize, PIL HSV round trip,
# float32 normalisation on the CPU) and OpenCV's INTER_LINEAR rule written out in numpy.

_MEAN = np.array(IMAGENET_MEAN, np.float32)
_STD = np.array(IMAGENET_STD, np.float32)


def _old_convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _old_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The previous photometric_distortion: float32 arithmetic and PIL's HSV round trip."""
    if rng.random() < 0.5:
        image = _old_convert(image, beta=rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        image = _old_convert(image, alpha=rng.uniform(0.5, 1.5))
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-18, 18) if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = np.array(Image.fromarray(image, "RGB").convert("HSV"))
        if saturation is not None:
            hsv[..., 1] = _old_convert(hsv[..., 1], alpha=saturation)
        if hue is not None:
            hsv[..., 0] = np.mod(np.rint(hsv[..., 0].astype(np.float32) + hue * 256.0 / 180.0), 256).astype(np.uint8)
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and rng.random() < 0.5:
        image = _old_convert(image, alpha=rng.uniform(0.5, 1.5))
    return image


def _old_train(image: Image.Image, label: np.ndarray, rng: np.random.Generator, **changes):
    """The previous TrainTransform: resize everything, crop, flip, photometric, normalise, pad (float32, int64)."""
    cfg = _data_cfg(**changes)
    transform = TrainTransform(cfg)  # only for its _crop_box/_crop_ok, which did not change
    crop_size = cfg["crop_size"]
    ratio = rng.uniform(*cfg["ratio_range"])
    factor = min(cfg["scale"][0] * ratio / max(image.size), cfg["scale"][1] * ratio / min(image.size))
    size = (max(1, int(image.width * factor + 0.5)), max(1, int(image.height * factor + 0.5)))
    pixels = np.asarray(image.resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    box = transform._crop_box(*label.shape, rng)
    if cfg["cat_max_ratio"] < 1.0:
        for _ in range(10):
            if transform._crop_ok(label[box[0] : box[2], box[1] : box[3]]):
                break
            box = transform._crop_box(*label.shape, rng)
    pixels, label = pixels[box[0] : box[2], box[1] : box[3]], label[box[0] : box[2], box[1] : box[3]]
    if rng.random() < 0.5:
        pixels, label = pixels[:, ::-1], label[:, ::-1]
    if cfg["photometric"]:
        pixels = _old_photometric(np.ascontiguousarray(pixels), rng)
    height, width = label.shape
    image_out = np.zeros((3, crop_size, crop_size), np.float32)
    image_out[:, :height, :width] = ((pixels.astype(np.float32) - _MEAN) / _STD).transpose(2, 0, 1)
    label_out = np.full((crop_size, crop_size), IGNORE_INDEX, np.int64)
    label_out[:height, :width] = label
    return torch.from_numpy(image_out), torch.from_numpy(label_out)


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


def test_photometric_distortion_equals_the_previous_one() -> None:
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (64, 77, 3)).astype(np.uint8),  # every kind of colour
        (rng.integers(0, 4, (50, 31, 3)) * 85).astype(np.uint8),  # ties between channels, greys, black, white
        np.asarray(_colour_coded_pair()[0]),
    ]
    for image in images:
        for seed in range(40):
            new = photometric_distortion(image, np.random.default_rng(seed))
            assert np.array_equal(new, _old_photometric(image, np.random.default_rng(seed))), seed


def test_region_resampling_equals_resize_then_crop() -> None:
    image = _test_image()  # 97x71
    pixels = np.asarray(image)
    rng = np.random.default_rng(1)
    for size in ((40, 29), (70, 52), (97, 71), (136, 100), (250, 183), (97, 120), (60, 100), (98, 75)):  # shrink,
        # same, enlarge, one side only, mixed, one pixel more (torch copies an axis whose sizes match: see _axis_window)
        references = {"antialias": np.asarray(image.resize(size, Image.BILINEAR)).astype(int),
                      "bilinear": _opencv_linear(pixels, size)}
        for _ in range(6):
            top, left = int(rng.integers(0, size[1] - 8)), int(rng.integers(0, size[0] - 8))
            height, width = int(rng.integers(8, 64)), int(rng.integers(8, 64))
            box = (top, left, min(size[1], top + height), min(size[0], left + width))
            for resize_filter, reference in references.items():
                crop = resize_region(image, size, box, resize_filter).astype(int)
                expected = reference[box[0] : box[2], box[1] : box[3]]
                assert crop.shape == expected.shape
                assert np.abs(crop - expected).max() <= 1, (size, box, resize_filter)
            region = resize_region(torch.from_numpy(pixels.copy()).permute(2, 0, 1), size, box)  # tensor input
            assert np.array_equal(region, resize_region(image, size, box))
        for box in ((0, 0, size[1], size[0]), (0, 0, min(size[1], 71), min(size[0], 97))):  # whole, up to the
            for resize_filter, reference in references.items():  # input's size (the axis-copy case)
                crop = resize_region(image, size, box, resize_filter).astype(int)
                assert np.abs(crop - reference[box[0] : box[2], box[1] : box[3]]).max() <= 1, (size, box)
        label = rng.integers(0, 7, (71, 97)).astype(np.uint8)
        rows, cols = nearest_indices(71, size[1]), nearest_indices(97, size[0])
        assert np.array_equal(label[np.ix_(rows, cols)], np.asarray(Image.fromarray(label).resize(size, Image.NEAREST)))


def test_bilinear_filter_has_opencv_semantics_and_antialias_is_pil() -> None:
    image = _test_image(seed=2)
    pixels = np.asarray(image)
    for size in ((33, 24), (60, 44), (150, 110), (300, 220)):
        out = resize_image(image, size, "bilinear").astype(int)
        assert np.abs(out - _opencv_linear(pixels, size)).max() <= 1, size
        assert np.array_equal(resize_image(image, size, "antialias"), np.asarray(image.resize(size, Image.BILINEAR)))
    for scale in ([40, 40], [300, 300]):
        size = (int(97 * scale[0] / 97 + 0.5), int(71 * scale[0] / 97 + 0.5))
        bilinear = ValTransform({"scale": scale, "resize_filter": "bilinear"})(image)
        assert np.abs(denormalize(bilinear).astype(int) - _opencv_linear(pixels, size)).max() <= 1
        antialias = ValTransform({"scale": scale})(image).numpy()  # unchanged: PIL bilinear, then float32
        old = (np.asarray(image.resize(size, Image.BILINEAR)).astype(np.float32) - _MEAN) / _STD
        assert np.array_equal(antialias, old.transpose(2, 0, 1))


def test_normalize_batch_equals_the_previous_float_output() -> None:
    image, label = _colour_coded_pair()
    transform = TrainTransform(_data_cfg(photometric=True))
    for seed in range(6):  # the old arithmetic on the same pixels, padding included: bit for bit
        raw, _, valid = transform(image, label, np.random.default_rng(seed))
        height, width = valid.tolist()
        old = np.zeros((3, 64, 64), np.float32)
        pixels = raw.numpy()[:, :height, :width].transpose(1, 2, 0)
        old[:, :height, :width] = ((pixels.astype(np.float32) - _MEAN) / _STD).transpose(2, 0, 1)
        assert torch.equal(normalize_batch(raw[None], valid[None])[0], torch.from_numpy(old))
    # with no resampling (ratio 1 at the image's own size) the whole pipeline is the previous one, bit for bit
    same = {"scale": [160, 120], "ratio_range": [1.0, 1.0], "photometric": True}
    for seed in range(12):
        raw, new_label, valid = TrainTransform(_data_cfg(**same))(image, label, np.random.default_rng(seed))
        old_image, old_label = _old_train(image, label, np.random.default_rng(seed), **same)
        assert torch.equal(normalize_batch(raw[None], valid[None])[0], old_image)
        assert torch.equal(new_label.long(), old_label)
    # with resampling: labels and padding exact, pixels within one grey level (photometric off: it would
    # amplify a one-level difference through PIL's 8-bit HSV)
    smooth = _test_image(160, 120, seed=3)
    smooth_label = np.kron(np.arange(12).reshape(3, 4), np.ones((40, 40))).astype(np.uint8)
    for image_, label_ in ((image, label), (smooth, smooth_label)):
        for seed in range(12):
            raw, new_label, valid = TrainTransform(_data_cfg())(image_, label_, np.random.default_rng(seed))
            old_image, old_label = _old_train(image_, label_, np.random.default_rng(seed))
            new_image = normalize_batch(raw[None], valid[None])[0]
            assert torch.equal(new_label.long(), old_label)
            assert torch.equal(new_image == 0, old_image == 0)  # the padding
            assert (new_image - old_image).abs().max() <= 1.0001 / min(IMAGENET_STD)


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
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(images.float(), valid)


def test_lookup_in_pairs_touches_only_its_view() -> None:
    from data.transforms import _lookup

    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, 256).astype(np.uint8)
    for region in (np.s_[:, :, :], np.s_[:, :7, :12], np.s_[:, 1:, 3:29], np.s_[:, :, :11], np.s_[:, 2:9, 1:2]):
        planes = rng.integers(0, 256, (3, 20, 31)).astype(np.uint8)
        expected = planes.copy()
        expected[region] = table[expected[region]]
        _lookup(planes[region], table)
        assert np.array_equal(planes, expected), region


# ---------------------------------------------------------------- dataset


def test_val_dataset_returns_original_size_label(make_ade_tree) -> None:
    root = make_ade_tree()
    dataset = SegmentationFolder(root, "validation", ValTransform({"scale": [80, 64]}))
    assert len(dataset) == 2
    image, label, name = dataset[1]
    assert image.shape == (3, 60, 80)  # 40x30 resized by min(80/40, 64/30) = 2
    assert label.shape == (30, 40) and label.dtype == torch.int64
    raw = np.array(Image.open(root / "annotations" / "validation" / "ADE_val_00000002.png"))
    assert name == "ADE_val_00000002"
    assert np.array_equal(label.numpy(), map_ade_labels(raw))


def test_max_images_keeps_the_first_files(make_ade_tree) -> None:
    dataset = SegmentationFolder(make_ade_tree(), "training", ValTransform({"scale": [40, 30]}), max_images=2)
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
        SegmentationFolder(root, "testing", ValTransform({"scale": [40, 30]}))
    bad = root / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.fromarray(np.full((30, 40), 200, np.uint8), "L").save(bad)
    dataset = SegmentationFolder(root, "validation", ValTransform({"scale": [40, 30]}))
    with pytest.raises(UserError, match="ADE_val_00000001.png.*200"):
        dataset[0]
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(UserError, match="ADE_train_00000002.jpg"):
        SegmentationFolder(root, "training", ValTransform({"scale": [40, 30]}))


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
    dataset = SegmentationFolder(root, "validation", ValTransform({"scale": [40, 30]}))
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
    for transform in (ValTransform({"scale": [40, 30]}), TrainTransform(_data_cfg())):
        with pytest.raises(UserError) as info:
            SegmentationFolder(root, "validation", transform)
        assert all(problem in str(info.value) for problem in expected) and "3 problem(s)" in str(info.value)
    assert check_layout(root)[0] == expected
    SegmentationFolder(root, "training", ValTransform({"scale": [40, 30]}))  # the other split is fine


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
    with pytest.raises(UserError, match="train.batch_size"):
        TrainSampler(10, 6, 0, 4, seed=0)


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
    config["data"]["dataset"] = "cityscapes"
    with pytest.raises(UserError, match="data.dataset"):
        prepare_dataset_root(config)


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
