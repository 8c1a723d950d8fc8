"""Paired image/label transforms: mmsegmentation's ADE20K training and test pipelines.

The training recipe follows mmseg's ``configs/_base_/datasets/ade20k.py``: random rescale within
``ratio_range`` of ``scale`` (keep ratio), random crop with ``cat_max_ratio``, horizontal flip,
``PhotoMetricDistortion``, ImageNet normalisation, then padding to the crop size (image 0 after
normalisation, label 255). Testing resizes the image to fit ``scale`` and keeps the label at its
original size. Unlike mmseg, every random number comes from an explicit ``np.random.Generator``,
so a training sample is a pure function of (image, label, seed), which makes runs resumable.

Speed (the data loader workers are the CPU budget of a training run; see ``TrainTransform``):

- The scale and the crop box are drawn first and only the outputs the crop needs are resampled,
  from the source pixels they need, with torch's vectorised uint8 kernels at the whole image's scale
  factors (``_resample_into``): the sampling positions are those of resize-then-crop. The
  ``cat_max_ratio`` test gathers each candidate crop of the label straight from the original label
  with the index arrays of PIL's nearest-neighbour resize (``nearest_indices``), bit-exact.
- The photometric distortion runs on 256-entry lookup tables (brightness, contrast) and on tables
  that reproduce PIL's 8-bit HSV conversions (saturation, hue): bit-exact with the float32 and PIL
  arithmetic it replaces, about 3x faster.
- ``TrainTransform`` ends at uint8; the float normalisation and the zero padding happen on the
  training device in ``normalize_batch``.

``data.resize_filter`` picks the image filter: ``antialias`` (PIL's bilinear, a triangle filter that
widens, i.e. low-pass filters, when shrinking; computed by torch's antialiased kernel, which follows
PIL's algorithm and differs from it by one grey level at ~0.1% of the pixels) or ``bilinear`` (OpenCV
``INTER_LINEAR``, as mmseg: two taps at half-pixel centres with the edge pixel repeated, no
antialiasing when shrinking). When the image grows, the two are the same filter. Labels always use
PIL's nearest neighbour (source pixel ``floor((x + 0.5) * in / out)``).

JPEG draft decoding (``Image.draft``, DCT-domain 1/2, 1/4, 1/8 scaling) is not used: it only applies
when the rescaled image is at most half the stored one, which ADE20K's recipe (short side 256..1024
from images of short side ~512) hardly ever asks for, and its pixels differ from either filter.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from configs import UserError
from data import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
NUM_ADE_CLASSES = 150
RESIZE_FILTERS = ("antialias", "bilinear")

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)
_IDENTITY = np.arange(256, dtype=np.uint8)


def map_ade_labels(raw: np.ndarray) -> np.ndarray:
    """Map ADE20K annotation ids to training labels: 0 ("other") -> 255, k -> k - 1 for k in 1..150.

    Args:
        raw: uint8 annotation with values in 0..150 (the dataset rejects larger values first).

    Returns:
        uint8 array of the same shape with values in 0..149 or 255.
    """
    return np.subtract(np.asarray(raw, dtype=np.uint8), np.uint8(1))  # uint8 wraps: 0 - 1 = 255 = IGNORE_INDEX


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


def _resize_filter(data: dict[str, Any]) -> str:
    """``data.resize_filter`` (default ``antialias``, for configs written before the key existed)."""
    value = data.get("resize_filter", "antialias")
    if value not in RESIZE_FILTERS:
        raise UserError(
            f"config key 'data.resize_filter' must be one of {', '.join(RESIZE_FILTERS)}, got {value!r}."
        )
    return value


def _rescale_size(width: int, height: int, long_bound: float, short_bound: float) -> tuple[int, int]:
    """New (width, height) so the image fits (long_bound, short_bound) keeping its aspect ratio (mmcv.imrescale)."""
    factor = min(long_bound / max(width, height), short_bound / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


# ---------------------------------------------------------------- resampling


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each of the ``dst`` outputs of PIL's nearest-neighbour resize of ``src`` pixels.

    PIL walks ``x = s / 2, s / 2 + s, ...`` with ``s = src / dst`` in double precision and truncates;
    the running sum is reproduced with ``np.cumsum``, so ``label[np.ix_(rows, cols)]`` equals
    ``Image.fromarray(label).resize(size, Image.NEAREST)`` bit for bit.
    """
    step = src / dst
    positions = np.full(dst, step)
    positions[0] = step * 0.5
    return np.minimum(np.cumsum(positions).astype(np.intp), src - 1)


def _shrinks(image: Image.Image, size: tuple[int, int]) -> bool:
    return size[0] < image.width or size[1] < image.height


def _bilinear_array(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV INTER_LINEAR resize of an HxWx3 uint8 array to ``size`` = (width, height), via torch (uint8 kernel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only numpy view of PIL's bytes; nothing writes to it
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # channels_last view, no copy
    out = F.interpolate(tensor, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).numpy()


def resize_image(image: Image.Image, size: tuple[int, int], resize_filter: str = "antialias") -> np.ndarray:
    """Resize a whole RGB image to ``size`` = (width, height); returns an HxWx3 uint8 array.

    ``antialias``: PIL bilinear. ``bilinear``: OpenCV INTER_LINEAR semantics; when both sides grow
    this is PIL's bilinear too (its triangle filter has two taps at half-pixel centres then), when a
    side shrinks torch's uint8 bilinear kernel (no antialiasing) does it.
    """
    if size == image.size:
        return np.asarray(image)
    if resize_filter == "bilinear" and _shrinks(image, size):
        return _bilinear_array(np.asarray(image), size)
    return np.asarray(image.resize(size, Image.BILINEAR))


def _axis_window(n_in: int, n_out: int, start: int, stop: int) -> tuple[bool, int, int, int]:
    """Plan one axis of a region resize: outputs ``start..stop-1`` of an ``n_in -> n_out`` resize.

    torch's kernels start their sampling grid at output 0, so the outputs ``0..stop-1`` are computed
    from the first ``need`` inputs, or, when the crop is nearer the far end, the same on the mirrored
    axis (``mirror``). Returns (mirror, start, stop, need) in that frame.
    """
    scale = n_in / n_out
    mirror = n_out - stop < start
    if mirror:
        start, stop = n_out - stop, n_out - start
    need = min(n_in, int(stop * scale + max(1.0, scale)) + 2)  # past the last window (+-max(1, scale))
    if need == stop and n_in != n_out:  # torch copies an axis whose input and output sizes match, whatever
        if need < n_in:  # the scale: keep them apart with one more input or one more output
            need += 1
        else:
            stop += 1  # here stop < n_out: stop == need == n_in != n_out, and stop = n_out would mean n_in = n_out
    return mirror, start, stop, need


def _as_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """RGB pixels as a uint8 [3, H, W] tensor: a decoded tensor as it is, a PIL image as a channels_last view."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected RGB pixels as a uint8 [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    image = image if image.mode == "RGB" else image.convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only numpy view of PIL's bytes; nothing writes to it
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def _resample_into(
    out: np.ndarray,
    source: torch.Tensor,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resize_filter: str,
    flip: bool = False,
    table: np.ndarray | None = None,
) -> None:
    """Write ``box`` = (top, left, bottom, right) of ``source`` (uint8 [3, H, W]) resized to ``size`` = (width,
    height) into the [3, h, w] uint8 array ``out``.

    Only the outputs from the nearer image corner to the box are computed, from the source pixels
    they need (``_axis_window``), with torch's uint8 kernels (channels_last) and the full-image scale
    factors, so the sampling positions are those of the whole resized image. ``antialias`` is torch's
    antialiased bilinear, which follows PIL's resampling (the same windows and fixed-point weights; it
    differs from PIL by one grey level at ~0.1% of pixels), ``bilinear`` is torch's bilinear (OpenCV
    INTER_LINEAR semantics). ``flip`` mirrors the result; ``table`` (256 entries) is applied to it.
    """
    top, left, bottom, right = box
    height, width = source.shape[-2:]
    if size == (width, height):
        crop = source[:, top:bottom, left:right]
        _copy_out(out, (crop.flip(2) if flip else crop).numpy(), table)
        return
    mirror_x, x_start, x_stop, x_need = _axis_window(width, size[0], left, right)
    mirror_y, y_start, y_stop, y_need = _axis_window(height, size[1], top, bottom)
    window = source[
        None, :, height - y_need if mirror_y else 0 : height if mirror_y else y_need,
        width - x_need if mirror_x else 0 : width if mirror_x else x_need,
    ]
    mirrored = [dim for dim, on in ((2, mirror_y), (3, mirror_x)) if on]
    if mirrored:
        window = window.flip(mirrored)
    window = window.contiguous(memory_format=torch.channels_last)  # the kernels' fast (vectorised) layout
    if resize_filter == "antialias":
        kernel = torch.ops.aten._upsample_bilinear2d_aa  # F.interpolate(antialias=True) with explicit scales
    else:
        kernel = torch.ops.aten.upsample_bilinear2d
    result = kernel(window, [y_stop, x_stop], False, size[1] / height, size[0] / width)
    result = result[0, :, y_start : y_start + bottom - top, x_start : x_start + right - left]
    back = [dim for dim, on in ((1, mirror_y), (2, mirror_x != flip)) if on]
    _copy_out(out, (result.flip(back) if back else result).numpy(), table)


def _copy_out(out: np.ndarray, planes: np.ndarray, table: np.ndarray | None) -> None:
    """``out[...] = planes``, then the lookup ``table`` if there is one."""
    out[...] = planes
    if table is not None:
        _lookup(out, table)


def _pair_table(table: np.ndarray) -> np.ndarray:
    """The 65536-entry table that applies the 256-entry ``table`` to both bytes of a uint16 (native byte order)."""
    low = table.astype(np.uint16)
    first, second = (low[None, :], low[:, None]) if sys.byteorder == "little" else (low[:, None], low[None, :])
    return (first | second << 8).ravel()


def _lookup(planes: np.ndarray, table: np.ndarray, pairs: np.ndarray | None = None) -> None:
    """``planes[...] = table[planes]`` in place for a 256-entry uint8 ``table``.

    Pixels are looked up in pairs (``pairs = _pair_table(table)`` on a uint16 view) where the rows
    allow it: numpy's gather is dominated by converting the indices, so halving their number halves its cost.
    """
    if planes.shape[-1] % 2 == 0 and planes.strides[-1] == 1 and all(st % 2 == 0 for st in planes.strides[:-1]):
        view = planes.view(np.uint16)
        np.take(_pair_table(table) if pairs is None else pairs, view, out=view, mode="clip")  # each output
    else:  # reads only its own index, so in place is safe
        np.take(table, planes, out=planes, mode="clip")


def resize_region(
    image: Image.Image | torch.Tensor,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resize_filter: str = "antialias",
) -> np.ndarray:
    """``box`` = (top, left, bottom, right) of the RGB image (PIL, or uint8 [3, H, W]) resized to ``size``.

    Computes only what the crop needs; returns an hxwx3 uint8 array within one grey level of
    ``resize_image(image, size, resize_filter)`` cropped to the box (see ``_resample_into``).
    """
    top, left, bottom, right = box
    planes = np.empty((3, bottom - top, right - left), np.uint8)
    _resample_into(planes, _as_tensor(image), size, box, resize_filter)
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


# ---------------------------------------------------------------- normalisation


def _normalize(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 (RGB) -> 3xHxW float32 tensor normalised with the ImageNet mean and std."""
    array = (image.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def normalize_batch(images: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise a uint8 batch from ``TrainTransform`` on whatever device it lives on.

    Args:
        images: uint8 [B, 3, H, W] (contiguous or channels_last, any device).
        valid: int64 [B, 2], the (height, width) of each sample's real crop at the top left; pixels
            outside it are set to 0, the padding value after normalisation. None: no padding.

    Returns:
        float32 [B, 3, H, W] ``(x - mean) / std`` in the memory format of ``images``: the same values as
        the CPU float pipeline produced before normalisation moved to the device.
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"normalize_batch expects a uint8 [B, 3, H, W] batch, got {images.dtype} of shape {tuple(images.shape)}"
        )
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    out = images.float().sub_(mean).div_(std)  # the same float32 operations as before, in place
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
    """Undo the normalisation of a 3xHxW tensor for figures.

    Args:
        image: normalised float tensor of shape 3xHxW (any device).

    Returns:
        HxWx3 uint8 RGB array.
    """
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0) * _STD + _MEAN
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- photometric distortion


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``values * alpha + beta`` clipped to 0..255 and cast back to uint8 (mmseg's ``convert``)."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables that reproduce PIL's RGB -> HSV -> RGB conversions bit for bit.

    Forward (taken from PIL itself): hue ``H_TAB[sector << 16 | a << 8 | c]`` and saturation
    ``S_TAB[max << 8 | min]``, where, with ``d* = max - *``, sector 0 (red is the maximum): a = dg,
    c = db; sector 1 (green, red is not): a = dr, c = db; sector 2 (blue only): a = dr, c = dg. PIL's
    hue only depends on these differences, its saturation on max and min.
    Backward: ``K[channel, h << 8 | s]`` holds the factor of V in PIL's ``hsv2rgb``
    (1 for the largest channel, ``1 - s/255``, ``1 - f s/255`` or ``1 - (s - f s)/255`` for the others,
    with PIL's float32/double steps), so that channel = ``uint8(v * K + 0.5)``; all 2^24 (h, s, v)
    and all 2^24 RGB colours were checked against PIL 13.
    """
    a, b = (x.ravel() for x in np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
    top = np.full_like(a, 255)

    def hsv(r: np.ndarray, g: np.ndarray, bl: np.ndarray) -> np.ndarray:
        rgb = np.stack([r, g, bl], -1).astype(np.uint8)[None]
        return np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))[0]

    hue = np.concatenate([hsv(top, 255 - a, 255 - b)[:, 0], hsv(255 - a, top, 255 - b)[:, 0],
                          hsv(255 - a, 255 - b, top)[:, 0]])
    saturation = np.zeros(65536, np.uint8)
    ordered = b <= a  # index max << 8 | min
    saturation[ordered] = hsv(a[ordered], b[ordered], b[ordered])[:, 1]

    h, s = a.astype(np.float64), b  # index h << 8 | s
    sector = np.floor(h * 6.0 / 255.0).astype(np.int64)
    f = (h * 6.0 / 255.0 - sector).astype(np.float32)
    fs = f * s.astype(np.float32)
    p = 1.0 - s / 255.0
    q = 1.0 - fs.astype(np.float64) / 255.0
    t = 1.0 - (s.astype(np.float32) - fs).astype(np.float64) / 255.0
    one = np.ones_like(p)
    order = [(one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q)]
    factors = np.stack([np.choose(sector % 6, [order[k][channel] for k in range(6)]) for channel in range(3)])
    factors[:, s == 0] = 1.0
    return hue, saturation, factors.astype(np.float32)


_H_TAB, _S_TAB, _K_TAB = _hsv_tables()
_H_TAB16 = _H_TAB.astype(np.uint16) << 8  # hue already in the high byte of the h << 8 | s index


def _hsv_adjust(
    planes: np.ndarray,
    hue_lut: np.ndarray,
    saturation_lut: np.ndarray,
    after: np.ndarray | None = None,
    before: np.ndarray | None = None,
    block: int = 1 << 16,
) -> None:
    """PIL's ``convert("HSV")``, per-value tables on H and S, ``convert("RGB")``, in place on [3, h, w] uint8 planes.

    Bit-exact with the PIL round trip and about 3x faster: gathers for H and S, then per channel one
    gather of V's factor (this sample's H and S tables folded into ``_K_TAB``) and a multiply.
    ``before`` / ``after``: 256-entry tables applied to the RGB values first / last (mmseg's brightness
    and contrast). Runs on blocks of about ``block`` pixels so that the temporaries stay in the CPU cache.
    """
    factors = np.take(_K_TAB, (hue_lut.astype(np.intp)[:, None] << 8 | saturation_lut).ravel(), axis=1)
    first = None if before is None else (before, _pair_table(before))
    last = None if after is None else (after, _pair_table(after))
    rows = max(1, block // max(1, planes.shape[2]))
    for top in range(0, planes.shape[1], rows):
        chunk = planes[:, top : top + rows]
        if first is not None:
            _lookup(chunk, *first)
        _hsv_block(chunk, factors)
        if last is not None:
            _lookup(chunk, *last)


def _hsv_block(planes: np.ndarray, factors: np.ndarray) -> None:
    """``_hsv_adjust`` on one block; ``factors`` = ``_K_TAB`` with this sample's H and S tables folded in."""
    r, g, b = planes
    vmax = np.maximum(r, g)
    np.maximum(vmax, b, out=vmax)
    vmin = np.minimum(r, g)
    np.minimum(vmin, b, out=vmin)
    dr, dg, db = vmax - r, vmax - g, vmax - b
    red_not_max = dr != 0
    a = dg.copy()  # see _hsv_tables: a = dg (red is the maximum) or dr
    np.copyto(a, dr, where=red_not_max)
    c = db.copy()  # c = db, or dg when blue alone is the maximum
    np.copyto(c, dg, where=(db == 0) & red_not_max)
    key = np.left_shift(a, 8, dtype=np.uint32)
    key |= c
    key |= np.left_shift(np.add(red_not_max, red_not_max & (dg != 0), dtype=np.uint8), 16, dtype=np.uint32)
    extremes = np.left_shift(vmax, 8, dtype=np.uint16)
    extremes |= vmin
    hs = np.take(_H_TAB16, key, mode="clip")
    hs |= np.take(_S_TAB, extremes, mode="clip")
    value = vmax.astype(np.float32)
    scratch = np.empty(value.shape, np.float32)
    for channel in range(3):
        np.take(factors[channel], hs, out=scratch, mode="clip")
        scratch *= value
        scratch += 0.5
        planes[channel] = scratch  # float -> uint8 truncates: rounds half up, like PIL


def _draw_photometric(
    rng: np.random.Generator,
) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray] | None, np.ndarray | None]:
    """The photometric draws in mmseg's order, as (RGB table before HSV, (hue, saturation) tables, RGB table after).

    Brightness and a contrast-first are folded into the first table; when there is no HSV step the
    two RGB tables are folded into one (returned first). Every table is the float32 arithmetic of
    mmseg's ``convert`` evaluated on 0..255, so a lookup gives the same values as the arithmetic.
    """
    before = after = None
    if rng.random() < 0.5:
        before = _convert(_IDENTITY, beta=rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        contrast = _convert(_IDENTITY, alpha=rng.uniform(0.5, 1.5))
        before = contrast if before is None else contrast[before]
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-18, 18) if rng.random() < 0.5 else None
    if not contrast_first and rng.random() < 0.5:
        after = _convert(_IDENTITY, alpha=rng.uniform(0.5, 1.5))
    if saturation is None and hue is None:
        if after is not None:
            before = after if before is None else after[before]
        return before, None, None
    hue_lut = _IDENTITY
    if hue is not None:
        shifted = _IDENTITY.astype(np.float32) + hue * 256.0 / 180.0
        hue_lut = np.mod(np.rint(shifted), 256).astype(np.uint8)
    saturation_lut = _IDENTITY if saturation is None else _convert(_IDENTITY, alpha=saturation)
    return before, (hue_lut, saturation_lut), after


def _photometric_planes(planes: np.ndarray, draws: tuple) -> None:
    """Apply ``_draw_photometric``'s result in place to [3, h, w] uint8 planes."""
    before, hsv, after = draws
    if hsv is not None:
        _hsv_adjust(planes, *hsv, after, before)
    elif before is not None:
        _lookup(planes, before)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on an HxWx3 uint8 RGB image, with randomness from ``rng``.

    Each step happens with probability 0.5: brightness + uniform(-32, 32); contrast x uniform(0.5, 1.5),
    either first or last (random mode); saturation x uniform(0.5, 1.5); hue + uniform(-18, 18) in
    OpenCV's 0..180 hue units (PIL's HSV uses 0..255, so the shift is rescaled). Brightness and
    contrast are mmseg's float32 ``convert`` (clip, truncate) as 256-entry tables; saturation and hue
    act on PIL's 8-bit HSV (``_hsv_adjust`` reproduces PIL's conversions exactly).
    """
    planes = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    _photometric_planes(planes, _draw_photometric(rng))
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


# ---------------------------------------------------------------- transforms


class TrainTransform:
    """Training augmentation: rescale, crop (cat_max_ratio), flip, photometric, pad; uint8 out.

    Per sample: the ratio and the crop box are drawn on the label alone (candidate crops gathered
    with ``nearest_indices``), then only the crop of the image is resampled (``_resample_into``,
    flipped on the way), the photometric distortion runs in place on its three uint8 planes, and
    ``normalize_batch`` later makes the float input on the training device. With the same draws the
    labels, the crop boxes and the padding equal the previous whole-image pipeline's; pixels are within
    one grey level before the photometric distortion (exactly equal when no resampling is needed).

    Args:
        data: the config's ``data`` section (``scale``, ``ratio_range``, ``crop_size``,
            ``cat_max_ratio``, ``photometric``, ``resize_filter``).
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
        self.resize_filter = _resize_filter(data)

    def _crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A random (top, left, bottom, right) crop of at most crop_size x crop_size."""
        top = int(rng.integers(0, max(height - self.crop_size, 0) + 1))
        left = int(rng.integers(0, max(width - self.crop_size, 0) + 1))
        return top, left, top + min(self.crop_size, height), left + min(self.crop_size, width)

    def _crop_ok(self, label: np.ndarray) -> bool:
        """mmseg's test: more than one labelled class and none covering ``cat_max_ratio`` of the labelled pixels."""
        label = np.ascontiguousarray(label)
        counts = np.array(Image.frombuffer("L", label.shape[::-1], label, "raw", "L", 0, 1).histogram())  # no copy
        counts[IGNORE_INDEX] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(
        self, image: Image.Image | torch.Tensor, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment one pair.

        The draws, in order: ratio, crop box (re-drawn up to 10 times for ``cat_max_ratio``), flip,
        photometric: the same draws, in the same order, as the previous implementation.

        Args:
            image: PIL image, or RGB pixels as a uint8 [3, H, W] tensor (the dataset's fast JPEG path).
            label: HxW uint8 training labels (already mapped, 255 = ignore), same size as the image.
            rng: the only source of randomness.

        Returns:
            (image uint8 [3, C, C], label uint8 [C, C], valid int64 [2]), C = crop_size: the crop sits at
            the top left, ``valid`` = its (height, width); the image is 0 and the label 255 outside it.
            ``normalize_batch(images, valid)`` turns a batch of these images into the normalised input.
        """
        source = _as_tensor(image)
        label = np.asarray(label, dtype=np.uint8)
        ratio = rng.uniform(*self.ratio_range)
        size = _rescale_size(source.shape[2], source.shape[1], self.scale[0] * ratio, self.scale[1] * ratio)
        rows = nearest_indices(label.shape[0], size[1])
        cols = nearest_indices(label.shape[1], size[0])

        def label_crop(box: tuple[int, int, int, int]) -> np.ndarray:  # C-contiguous, unlike label[r][:, c]
            return np.take(np.take(label, rows[box[0] : box[2]], axis=0), cols[box[1] : box[3]], axis=1)

        box = self._crop_box(size[1], size[0], rng)
        crop = label_crop(box)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                if self._crop_ok(crop):
                    break
                box = self._crop_box(size[1], size[0], rng)
                crop = label_crop(box)
        flip = rng.random() < 0.5
        before, hsv, after = _draw_photometric(rng) if self.photometric else (None, None, None)

        height, width = crop.shape
        image_out = np.empty((3, self.crop_size, self.crop_size), np.uint8)
        label_out = np.empty((self.crop_size, self.crop_size), np.uint8)
        image_out[:, height:], image_out[:, :height, width:] = 0, 0  # the padding only
        label_out[height:], label_out[:height, width:] = IGNORE_INDEX, IGNORE_INDEX
        planes = image_out[:, :height, :width]
        # photometric is per pixel, so it commutes with the flip; without HSV the brightness/contrast
        # table is applied to the resampled crop, with HSV block by block inside _hsv_adjust
        _resample_into(planes, source, size, box, self.resize_filter, flip, None if hsv else before)
        if hsv is not None:
            _hsv_adjust(planes, *hsv, after, before)
        label_out[:height, :width] = crop[:, ::-1] if flip else crop
        valid = torch.tensor((height, width), dtype=torch.int64)
        return torch.from_numpy(image_out), torch.from_numpy(label_out), valid


class ValTransform:
    """Test-time transform: resize (keep ratio, may upscale) to fit ``scale``, then normalise.

    Args:
        data: the config's ``data`` section (``scale``, ``resize_filter``).
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.scale = _pair(data, "scale", float)
        self.resize_filter = _resize_filter(data)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """Return the 3xhxw float32 normalised, resized image; the label is left to the caller at full size."""
        if isinstance(image, torch.Tensor):
            image = Image.fromarray(np.ascontiguousarray(_as_tensor(image).permute(1, 2, 0).numpy()), "RGB")
        image = image if image.mode == "RGB" else image.convert("RGB")
        size = _rescale_size(image.width, image.height, *self.scale)
        return _normalize(resize_image(image, size, self.resize_filter))
