"""Paired image/label transforms: mmsegmentation's ADE20K training and test pipelines.

The training recipe is mmseg's ``configs/_base_/datasets/ade20k.py``: rescale keeping the aspect ratio to fit
``scale`` x U(``ratio_range``), a random ``crop_size`` crop re-drawn up to 10 times while one class covers
``cat_max_ratio`` of its labelled pixels, a horizontal flip with probability 0.5, ``PhotoMetricDistortion``, then
normalisation and padding to the crop size (image 0 after normalisation, label 255). Testing resizes the image to
fit ``scale`` and keeps the label at its original size. Every random number comes from the ``np.random.Generator``
passed in, so a training sample is a function of (image, label, seed) and a resumed run sees the same samples.

For speed (docs/gpu-and-clusters.md, "Data pipeline"), only the source region that becomes the crop is resampled
(the image by torchvision's ``resized_crop``, the label by PIL's nearest neighbour, on one grid: the crop's pixel
centres, within half a source pixel of resize-then-crop's), and ``TrainTransform`` ends at uint8: the normalisation
happens on the training device (``normalize_batch``). ``data.resize_filter``: ``antialias`` is PIL's bilinear
(low-pass when shrinking), ``bilinear`` OpenCV's ``INTER_LINEAR`` as in mmseg; the same filter when growing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from data import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
NUM_ADE_CLASSES = 150
_HUE_OF_CHANNEL = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)  # red, green, blue on HSV's hue circle of 6 sectors


def map_ade_labels(raw: np.ndarray) -> np.ndarray:
    """Map uint8 ADE20K annotation ids (0..150) to training labels: 0 ("other") -> 255, k -> k - 1 for k in 1..150."""
    return np.subtract(np.asarray(raw, dtype=np.uint8), np.uint8(1))  # uint8 wraps: 0 - 1 = 255 = IGNORE_INDEX


def _as_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """RGB pixels as a uint8 [3, H, W] tensor: a decoded tensor as it is, a PIL image converted."""
    return TF.pil_to_tensor(image.convert("RGB")) if isinstance(image, Image.Image) else image


def rescale_size(height: int, width: int, bounds: tuple[float, float]) -> tuple[int, int]:
    """(height, width) rescaled keeping the aspect ratio so that the long and short sides fit ``bounds`` (mmcv's
    ``imrescale``: ``bounds`` = (long, short) in either order), at least 1 pixel each (where mmcv's would be 0)."""
    factor = min(max(bounds) / max(height, width), min(bounds) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


# ---------------------------------------------------------------- photometric distortion
def adjust_brightness(pixels: torch.Tensor, delta: float) -> torch.Tensor:
    """mmseg's brightness step in place on float RGB 0..255: + ``delta``, clipped, truncated as its uint8 cast."""
    return pixels.add_(delta).clamp_(0, 255).floor_()


def adjust_contrast(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """mmseg's contrast step in place on float RGB 0..255: x ``factor``, clipped, truncated as its uint8 cast."""
    return pixels.mul_(factor).clamp_(0, 255).floor_()


def scale_saturation(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """HSV saturation x ``factor`` (capped at 1) with hue and value kept, in place on float [3, h, w] RGB in 0..255.

    With the value V (the largest channel) fixed, every channel moves along ``V + gain * (channel - V)``: gain =
    ``factor``, or V / chroma where that would take the smallest channel below 0 (saturation 1). Rounded.
    """
    value = pixels.amax(0)
    gain = (value / (value - pixels.amin(0)).clamp_(min=1)).clamp_(max=factor)  # chroma >= 1 unless it is 0
    return pixels.sub_(value).mul_(gain).add_(value).round_()


def shift_hue(pixels: torch.Tensor, degrees: float) -> torch.Tensor:
    """HSV hue + ``degrees`` with saturation and value kept, on float [3, h, w] RGB holding whole numbers 0..255.

    Equals torchvision's ``adjust_hue(image, degrees / 360)`` within rounding, about 6x faster. The hue is a
    position on a circle of 6 sectors, red at 0, green at 2, blue at 4 (RGB to HSV); a channel is the value V
    within 1 sector of its own colour, V - chroma beyond 2 sectors, and linear in between (HSV to RGB). Rounded.
    """
    red, green, blue = pixels
    value = pixels.amax(0)
    chroma = value - pixels.amin(0)
    # hue x chroma: green - blue where red is the largest, blue - red + 2 chroma where green is, red - green +
    # 4 chroma where blue is (the weights min(V - channel, 1) are 0 exactly where a channel is the largest)
    hue = torch.lerp(torch.add(blue - red, chroma, alpha=2), torch.add(red - green, chroma, alpha=4),
                     (value - green).clamp_(max=1))
    hue = torch.lerp(green - blue, hue, (value - red).clamp_(max=1))
    hue.div_(chroma.clamp(min=1)).add_(degrees / 60)  # in -1.6..5.6 sectors: |shift| < 1
    offset = (hue - _HUE_OF_CHANNEL).abs_()  # from each channel's colour, 0..5.6 sectors: 6 - offset beyond 3
    above_min = offset.sub_(3).abs_().sub_(1).clamp_(0, 1)  # (3 - circular distance) - 1, in 0..1
    return above_min.mul_(chroma).add_(value - chroma).round_()


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator, block: int = 32768) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a uint8 [3, h, w] RGB image, every random number from ``rng``.

    Each step happens with probability 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5), either second or
    last (a coin decides); saturation x U(0.5, 1.5); hue + an integer in -18..17 of OpenCV's 2-degree units.
    The draws come first, in mmseg's order; the steps then run on float pixels holding whole numbers 0..255
    between steps (as mmseg's uint8 image), on rows of about ``block`` pixels at a time: whole-crop float
    temporaries would cost more in cache misses and page faults than the arithmetic.
    """
    steps = []
    if rng.random() < 0.5:
        steps.append((adjust_brightness, rng.uniform(-32, 32)))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        steps.append((adjust_contrast, rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        steps.append((scale_saturation, rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        steps.append((shift_hue, 2.0 * int(rng.integers(-18, 18))))
    if not contrast_first and rng.random() < 0.5:
        steps.append((adjust_contrast, rng.uniform(0.5, 1.5)))
    out = np.empty(image.shape, np.uint8)
    rows = max(1, block // image.shape[2])
    for top in range(0, image.shape[1], rows):
        pixels = image[:, top : top + rows].to(torch.float32, memory_format=torch.contiguous_format)
        for step, *args in steps:
            pixels = step(pixels, *args)
        out[:, top : top + rows] = pixels.numpy()  # numpy's cast to uint8 is about 4x faster than torch's
    return torch.from_numpy(out)


def normalize_batch(images: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``(x - mean) / std`` of a uint8 [B, 3, H, W] batch, on its device and in its memory format.

    ``valid`` (int64 [B, 2]) is the (height, width) of each sample's real crop at the top left; pixels outside it
    are set to 0, the padding value after normalisation.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    out = images.float().sub_(mean).div_(std)
    if valid is None:
        return out
    if images.device.type == "cpu":  # zero just the padding (reading valid costs nothing here)
        for sample, (rows, cols) in zip(out, valid.tolist()):
            sample[:, rows:] = 0.0
            sample[:, :rows, cols:] = 0.0
        return out
    height, width = images.shape[-2:]  # one masked fill, no host synchronisation
    valid = valid.to(images.device)
    rows = torch.arange(height, device=images.device) < valid[:, 0, None]
    cols = torch.arange(width, device=images.device) < valid[:, 1, None]
    out.masked_fill_(~(rows[:, None, :, None] & cols[:, None, None, :]), 0.0)
    return out


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of a 3xHxW tensor (any device) for figures: HxWx3 uint8 RGB."""
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


class TrainTransform:
    """Training augmentation, in the recipe's order: rescale, crop (cat_max_ratio), flip, photometric; uint8 out.

    ``data`` is the config's validated ``data`` section.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.scale = data["scale"]
        self.ratio_range = data["ratio_range"]
        self.crop_size = data["crop_size"]
        self.cat_max_ratio = data["cat_max_ratio"]
        self.photometric = data["photometric"]
        self.antialias = data["resize_filter"] == "antialias"

    def __call__(
        self, image: Image.Image | torch.Tensor, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment one pair: a PIL image or uint8 [3, H, W] tensor and its HxW uint8 training labels, with ``rng``
        the only source of randomness.

        Returns (image uint8 [3, C, C], label uint8 [C, C], valid int64 [2]), C = crop_size: the crop sits at the
        top left, ``valid`` = its (height, width); the image is 0 and the label 255 outside it.
        """
        image, label = _as_tensor(image), Image.fromarray(label)
        ratio = rng.uniform(*self.ratio_range)  # mmcv's RandomResize: the bounds are int(scale x ratio)
        size = rescale_size(label.height, label.width, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        box, crop = self._crop(label, size, rng)
        for _ in range(10 if self.cat_max_ratio < 1 else 0):  # mmseg: check, re-draw, at most 10 times
            if self._balanced(crop):
                break
            box, crop = self._crop(label, size, rng)
        image, label = TF.resized_crop(image, *box, antialias=self.antialias), torch.from_numpy(np.array(crop))
        if rng.random() < 0.5:
            image, label = TF.horizontal_flip(image), TF.horizontal_flip(label)
        if self.photometric:
            image = photometric_distortion(image, rng)
        height, width = label.shape
        padding = [0, self.crop_size - width, 0, self.crop_size - height]
        image, label = F.pad(image, padding, value=0), F.pad(label, padding, value=IGNORE_INDEX)
        return image, label, torch.tensor((height, width))

    def _crop(self, label: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> tuple[tuple, Image.Image]:
        """A random crop of the image rescaled to ``size`` = (height, width): ``resized_crop``'s (top, left, height,
        width, [crop height, crop width]), the source region rounded to whole pixels and the crop's size, and the
        label's crop (PIL's nearest neighbour samples the region at ``resized_crop``'s points: its cell centres)."""
        top = int(rng.integers(0, max(size[0] - self.crop_size, 0) + 1))
        left = int(rng.integers(0, max(size[1] - self.crop_size, 0) + 1))
        crop = [min(self.crop_size, size[0]), min(self.crop_size, size[1])]
        scale_y, scale_x = label.height / size[0], label.width / size[1]
        y0, y1 = round(top * scale_y), round((top + crop[0]) * scale_y)
        x0, x1 = round(left * scale_x), round((left + crop[1]) * scale_x)
        return (y0, x0, y1 - y0, x1 - x0, crop), label.resize(crop[::-1], Image.NEAREST, box=(x0, y0, x1, y1))

    def _balanced(self, crop: Image.Image) -> bool:
        """mmseg's test: more than one labelled class and none covering ``cat_max_ratio`` of the labelled pixels."""
        counts = [count for count in crop.histogram()[:IGNORE_INDEX] if count]  # 255 = ignored: not counted
        return len(counts) > 1 and max(counts) / sum(counts) < self.cat_max_ratio


class ValTransform:
    """Test-time transform: resize (keep ratio, may upscale) to fit ``data["scale"]``, then normalise."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.scale = data["scale"]
        self.antialias = data["resize_filter"] == "antialias"

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """Return the 3xhxw float32 normalised, resized image; the label is left to the caller at full size."""
        image = _as_tensor(image)
        resized = TF.resize(image, list(rescale_size(*image.shape[1:], self.scale)), antialias=self.antialias)
        return normalize_batch(resized[None])[0].contiguous()
