"""Paired image/label transforms: mmsegmentation's ADE20K training and test pipelines.

The training recipe follows mmseg's ``configs/_base_/datasets/ade20k.py``: random rescale within
``ratio_range`` of ``scale`` (keep ratio), random crop with ``cat_max_ratio``, horizontal flip,
``PhotoMetricDistortion``, ImageNet normalisation, then padding to the crop size (image 0 after
normalisation, label 255). Testing resizes the image to fit ``scale`` and keeps the label at its
original size. Unlike mmseg, every random number comes from an explicit ``np.random.Generator``,
so a training sample is a pure function of (image, label, seed), which makes runs resumable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from configs import UserError
from data import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
NUM_ADE_CLASSES = 150

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)


def map_ade_labels(raw: np.ndarray) -> np.ndarray:
    """Map ADE20K annotation ids to training labels: 0 ("other") -> 255, k -> k - 1 for k in 1..150.

    Args:
        raw: uint8 annotation with values in 0..150 (the dataset rejects larger values first).

    Returns:
        uint8 array of the same shape with values in 0..149 or 255.
    """
    raw = np.asarray(raw, dtype=np.uint8)
    return np.where(raw == 0, np.uint8(IGNORE_INDEX), raw - np.uint8(1)).astype(np.uint8)


def _pair(data: dict[str, Any], key: str, kind: type) -> tuple[Any, Any]:
    """Read a two-element list ``data[key]`` of positive numbers, or raise a UserError naming ``data.key``."""
    value = data.get(key)
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise UserError(
            f"config key 'data.{key}' must be a list of two positive numbers (like [2048, 512]), got {value!r}. "
            f"Fix it in the config file or override it, e.g. data.{key}=[2048,512]."
        )
    return kind(value[0]), kind(value[1])


def _rescale_size(width: int, height: int, long_bound: float, short_bound: float) -> tuple[int, int]:
    """New (width, height) so the image fits (long_bound, short_bound) keeping its aspect ratio (mmcv.imrescale)."""
    factor = min(long_bound / max(width, height), short_bound / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def _normalize(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 (RGB) -> 3xHxW float32 tensor normalised with the ImageNet mean and std."""
    array = (image.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of a 3xHxW tensor for figures.

    Args:
        image: normalised float tensor of shape 3xHxW (any device).

    Returns:
        HxWx3 uint8 RGB array.
    """
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0) * _STD + _MEAN
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``values * alpha + beta`` clipped to 0..255 and cast back to uint8 (mmseg's ``convert``)."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on an HxWx3 uint8 RGB image, with randomness from ``rng``.

    Each step happens with probability 0.5: brightness + uniform(-32, 32); contrast x uniform(0.5, 1.5),
    either first or last (random mode); saturation x uniform(0.5, 1.5); hue + uniform(-18, 18) in
    OpenCV's 0..180 hue units (PIL's HSV uses 0..255, so the shift is rescaled).
    """
    if rng.random() < 0.5:
        image = _convert(image, beta=rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        image = _convert(image, alpha=rng.uniform(0.5, 1.5))
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-18, 18) if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = np.array(Image.fromarray(image, "RGB").convert("HSV"))
        if saturation is not None:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
        if hue is not None:
            shifted = hsv[..., 0].astype(np.float32) + hue * 256.0 / 180.0
            hsv[..., 0] = np.mod(np.rint(shifted), 256).astype(np.uint8)
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and rng.random() < 0.5:
        image = _convert(image, alpha=rng.uniform(0.5, 1.5))
    return image


class TrainTransform:
    """Training augmentation: rescale, crop (cat_max_ratio), flip, photometric, normalise, pad.

    Args:
        data: the config's ``data`` section (``scale``, ``ratio_range``, ``crop_size``,
            ``cat_max_ratio``, ``photometric``).
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.scale = _pair(data, "scale", float)
        self.ratio_range = _pair(data, "ratio_range", float)
        crop = data.get("crop_size")
        if not isinstance(crop, int) or isinstance(crop, bool) or crop <= 0:
            raise UserError(f"config key 'data.crop_size' must be a positive integer (like 512), got {crop!r}.")
        self.crop_size = crop
        self.cat_max_ratio = float(data.get("cat_max_ratio", 1.0))
        self.photometric = bool(data.get("photometric", True))

    def _crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A random (top, left, bottom, right) crop of at most crop_size x crop_size."""
        top = int(rng.integers(0, max(height - self.crop_size, 0) + 1))
        left = int(rng.integers(0, max(width - self.crop_size, 0) + 1))
        return top, left, top + min(self.crop_size, height), left + min(self.crop_size, width)

    def _crop_ok(self, label: np.ndarray) -> bool:
        """mmseg's test: more than one labelled class and none covering ``cat_max_ratio`` of the labelled pixels."""
        counts = np.bincount(label.ravel(), minlength=256)
        counts[IGNORE_INDEX] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one pair.

        Args:
            image: RGB PIL image.
            label: HxW uint8 training labels (already mapped, 255 = ignore), same size as the image.
            rng: the only source of randomness.

        Returns:
            (3xCxC float32 normalised image, CxC int64 label), C = crop_size.
        """
        image = image if image.mode == "RGB" else image.convert("RGB")
        ratio = rng.uniform(*self.ratio_range)
        size = _rescale_size(image.width, image.height, self.scale[0] * ratio, self.scale[1] * ratio)
        pixels = np.asarray(image.resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))

        box = self._crop_box(*label.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                if self._crop_ok(label[box[0] : box[2], box[1] : box[3]]):
                    break
                box = self._crop_box(*label.shape, rng)
        pixels = pixels[box[0] : box[2], box[1] : box[3]]
        label = label[box[0] : box[2], box[1] : box[3]]

        if rng.random() < 0.5:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)

        height, width = label.shape
        image_out = np.zeros((3, self.crop_size, self.crop_size), np.float32)
        image_out[:, :height, :width] = ((pixels.astype(np.float32) - _MEAN) / _STD).transpose(2, 0, 1)
        label_out = np.full((self.crop_size, self.crop_size), IGNORE_INDEX, np.int64)
        label_out[:height, :width] = label
        return torch.from_numpy(image_out), torch.from_numpy(label_out)


class ValTransform:
    """Test-time transform: resize (bilinear, keep ratio, may upscale) to fit ``scale``, then normalise.

    Args:
        data: the config's ``data`` section (``scale``).
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.scale = _pair(data, "scale", float)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return the 3xhxw normalised, resized image; the label is left to the caller at full size."""
        size = _rescale_size(image.width, image.height, *self.scale)
        return _normalize(np.asarray(image.convert("RGB").resize(size, Image.BILINEAR)))
