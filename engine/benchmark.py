"""Benchmarks of norm-conv, def-conv-v1 and def-conv-v2: training and inference speed, memory, the op, the data.

Models: the config given with ``model.deform.version`` set to 0, 1 and 2 (random weights), run on
synthetic inputs exactly as train.py runs them (aux head, ``compute_loss``, SGD step, channels_last
and autocast on CUDA). Every time is the median of single iterations, each synchronised on CUDA,
after untimed warm-up iterations; the median keeps a busy machine's hiccups out. ``--ops`` times
torchvision's ``deform_conv2d`` against ``F.conv2d`` at the shapes of the model's deformable layers
and checks it against a float64 reference; ``--data`` times the real ADE20K training pipeline in one
process and says how many loader workers a GPU needs to be fed."""

from __future__ import annotations

import copy
import gc
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import deform_conv2d

from configs import UserError, load_config
from data import IGNORE_INDEX
from engine.loss import LOSS_OPS, compute_loss
from engine.offsets import capture_offsets
from engine.optim import build_optimizer
from engine.precision import AMP_DTYPES, autocast, memory_format
from models import triton_deform
from models.segmentor import build_model
from models.triton_support import triton_available

VARIANTS = {"norm": ("norm-conv", 0), "v1": ("def-conv-v1", 1), "v2": ("def-conv-v2", 2)}
# Code paths the model benchmark can time, by the names the config keys use (both ops on the path).
PATHS = ("reference", "triton")
# reference: norm-conv training on one H100 (torch 2.11, batch 16, 512 crop, bf16), from the issue tracker
H100_NORM_CONV_IMAGES_PER_S = 150.0
GIB = 2**30


@dataclass
class BenchOptions:
    """What to benchmark (the fields of scripts/benchmark.py's command line, same names)."""

    config: str
    device: str | None = None
    batch_size: int = 16
    crop: int = 512
    amp: str | None = None
    iters: int = 20
    warmup: int = 5
    variants: str = "norm,v1,v2"
    paths: str | None = None
    ops: bool = False
    data: bool = False
    data_samples: int = 64
    data_images: int = 8
    overrides: list[str] = field(default_factory=list)


def check_options(args: BenchOptions) -> tuple[torch.device, list[str], list[str]]:
    """Validate the numbers and names on the command line; return the device, the variant keys and the paths."""
    for name in ("batch_size", "crop", "iters", "data_samples", "data_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}.")
    if args.crop % 8:
        raise UserError(f"--crop must be a multiple of 8 (the model's output stride), got {args.crop}.")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown or len(set(variants)) != len(variants):
        raise UserError(f"--variants must list some of {', '.join(VARIANTS)} once each, got '{args.variants}'.")
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA device here. Use --device cpu.")
    device = torch.device(device_name)
    can_triton = triton_available(device)
    paths = [p.strip() for p in (args.paths or ("reference,triton" if can_triton else "reference")).split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths) or len(set(paths)) != len(paths):
        raise UserError(f"--paths must list some of {', '.join(PATHS)} once each, got '{args.paths}'.")
    if "triton" in paths and not can_triton:
        raise UserError(
            f"--paths triton needs the Triton kernels, which run on CUDA (Triton installed) and not on {device_name} "
            f"here. Use --paths reference, or run on a GPU."
        )
    return device, [v for v in VARIANTS if v in variants], [p for p in PATHS if p in paths]


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_each(step: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of single calls of ``step`` (each synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def synthetic_batch(batch: int, crop: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images and labels in 0..num_classes-1 with about 10% ignore (255) pixels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=gen)
    labels = torch.randint(0, num_classes, (batch, crop, crop), generator=gen)
    labels[torch.rand(batch, crop, crop, generator=gen) < 0.1] = IGNORE_INDEX
    return images.to(device), labels.to(device)


# ------------------------------------------------------------------------------------------------ models
def variant_config(config: dict[str, Any], version: int, path: str = "reference") -> dict[str, Any]:
    """The config with ``model.deform.version`` and the ops of ``path`` set, and no ImageNet download."""
    config = copy.deepcopy(config)
    config["model"]["deform"]["version"] = version
    config["model"]["pretrained_backbone"] = False
    config["model"]["deform_op"] = path
    config["train"]["loss_op"] = path
    return config


class ModelBench:
    """One model variant set up as train.py sets it up, with its optimizer and a synthetic batch."""

    def __init__(
        self, name: str, config: dict[str, Any], args: BenchOptions, device: torch.device, amp_dtype: torch.dtype | None
    ) -> None:
        tcfg, mcfg = config["train"], config["model"]
        self.name, self.device, self.amp_dtype, self.mcfg, self.tcfg = name, device, amp_dtype, mcfg, tcfg
        cuda = device.type == "cuda"
        layout = memory_format(device, tcfg["channels_last"])
        torch.manual_seed(0)
        model, _ = build_model(config, load_pretrained=False)
        self.model = model.to(device, memory_format=layout)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
        self.net = torch.compile(self.model) if tcfg["compile"] else self.model
        images, self.labels = synthetic_batch(args.batch_size, args.crop, mcfg["num_classes"], device)
        self.images = images.contiguous(memory_format=layout)
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + [self.images, self.labels]
        self.static_bytes = sum(t.numel() * t.element_size() for t in tensors)  # what inference needs resident

    def held_bytes(self) -> int:
        """Bytes this variant holds between training steps: weights, inputs, gradients, optimizer state."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return self.static_bytes + sum(t.numel() * t.element_size() for t in grads + state)

    def train_step(self) -> None:
        """Forward with the aux head, the training loss, backward and an SGD step (as engine.trainer)."""
        with autocast(self.device, self.amp_dtype):
            outputs = self.net(self.images)
        loss = compute_loss(outputs, self.labels, self.mcfg["aux_loss_weight"], self.tcfg["loss_op"],
                            self.tcfg["loss_norm"])["total"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def infer_step(self) -> None:
        """Eval-mode logits upsampled to the input size, as evaluation does."""
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            logits = self.net(self.images)["out"]
            F.interpolate(logits, size=self.images.shape[-2:], mode="bilinear", align_corners=False)


def run_steps(bench: ModelBench, step: Callable[[], None], count: int, own_bytes: int) -> tuple[list[float], int | None]:
    """Run ``step`` ``count`` times; return the milliseconds of each and this variant's peak CUDA bytes (None on CPU).

    ``own_bytes`` is what the variant holds resident before the steps. The other variants stay on the
    GPU meanwhile; what they hold is constant during these steps and is subtracted.
    """
    device = bench.device
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        others = torch.cuda.memory_allocated(device) - own_bytes
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return times, (torch.cuda.max_memory_allocated(device) - others if cuda else None)


def bench_models(
    configs: list[tuple[str, dict[str, Any]]], args: BenchOptions, device: torch.device, amp_dtype: torch.dtype | None
) -> list[dict[str, Any]]:
    """Training and inference images/s and peak memory of every variant.

    All variants are built first; after each one's warm-up the timed iterations go round-robin (one
    iteration of each variant in turn), so a change in machine load hits every variant alike and the
    ratios stay fair. Images/s is the batch size over the median iteration time.
    """
    try:
        benches = [ModelBench(name, config, args, device, amp_dtype) for name, config in configs]
        results = {b.name: {"name": b.name, "train_ms": [], "infer_ms": []} for b in benches}
        peaks: dict[str, dict[str, int]] = {b.name: {"train": 0, "infer": 0} for b in benches}
        for mode in ("train", "infer"):
            for b in benches:
                b.model.train(mode == "train")

            def run(b: ModelBench, count: int) -> list[float]:
                # Training counts gradients and momentum as the variant's own; inference only weights and inputs.
                step, own = (b.train_step, b.held_bytes()) if mode == "train" else (b.infer_step, b.static_bytes)
                times, peak = run_steps(b, step, count, own)
                peaks[b.name][mode] = max(peaks[b.name][mode], peak or 0)
                return times

            for b in benches:
                run(b, args.warmup)
            for _ in range(args.iters):
                for b in benches:
                    results[b.name][f"{mode}_ms"] += run(b, 1)
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"CUDA out of memory with --batch-size {args.batch_size} --crop {args.crop} and {len(configs)} variants "
            f"resident. Use a smaller batch or crop, --amp bf16, or fewer --variants per run."
        ) from None
    finally:
        benches, b = [], None  # free the models before the next part
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    records = []
    for name, r in results.items():
        cuda = device.type == "cuda"
        records.append({
            "name": name,
            "train_images_per_s": 1000.0 * args.batch_size / statistics.median(r["train_ms"]),
            "infer_images_per_s": 1000.0 * args.batch_size / statistics.median(r["infer_ms"]),
            "peak_mem_gib": peaks[name]["train"] / GIB if cuda else None,
            "infer_peak_mem_gib": peaks[name]["infer"] / GIB if cuda else None,
            "train_ms": r["train_ms"],
            "infer_ms": r["infer_ms"],
        })
    return records


def add_ratios(models: list[dict[str, Any]]) -> None:
    """``*_ratio`` = value / the value of norm-conv on the same path; ``train_path_speedup`` = training images/s
    over the same variant's on the reference path (None where a row or value is missing)."""
    for m in models:
        ref = next((r for r in models if r["deform_version"] == 0 and r["path"] == m["path"]), None)
        pairs = (("train_images_per_s", "train_ratio"), ("infer_images_per_s", "infer_ratio"), ("peak_mem_gib", "mem_ratio"))
        for key, ratio in pairs:
            ok = ref is not None and m[key] is not None and ref[key]
            m[ratio] = m[key] / ref[key] if ok else None
        base = next((r for r in models if r["deform_version"] == m["deform_version"] and r["path"] == "reference"), None)
        m["train_path_speedup"] = m["train_images_per_s"] / base["train_images_per_s"] if base else None


# --------------------------------------------------------------------------------------------------- ops
def torchvision_deform(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, **conv_args: Any
) -> torch.Tensor:
    """torchvision's deformable conv (v1 without ``mask``, v2 with it), no bias."""
    return deform_conv2d(x, offset, weight, None, mask=mask, **conv_args)


def triton_deform_op(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, **conv_args: Any
) -> torch.Tensor:
    """The Triton deformable conv (models/triton_deform.py), no bias."""
    return triton_deform.deform_conv2d(x, offset, weight, None, mask=mask, **conv_args)


# Implementations of the deformable op timed by --ops, by the name in the rows' ``impl`` ("+mask" added
# for v2). Each takes (input, offset, weight, mask or None, stride=, padding=, dilation=) like
# torchvision's op; another implementation is one more entry here. "triton" is timed where Triton runs.
DEFORM_IMPLS: dict[str, Callable[..., torch.Tensor]] = {"torchvision": torchvision_deform, "triton": triton_deform_op}


def runnable(impls: dict[str, Callable[..., torch.Tensor]], device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """The implementations that really run on ``device`` (the Triton ones fall back to the reference elsewhere)."""
    return {name: fn for name, fn in impls.items() if name != "triton" or triton_available(device)}


def layer_shapes(config: dict[str, Any], crop: int, device: torch.device) -> list[dict[str, Any]]:
    """Geometry of every deformable layer of the v2 model at a ``crop`` input, one entry per distinct shape."""
    model, _ = build_model(variant_config(config, 2), load_pretrained=False)
    model.to(device).eval()
    found: dict[tuple, dict[str, Any]] = {}
    with torch.inference_mode(), capture_offsets(model) as captured:
        model(torch.zeros(1, 3, crop, crop, device=device))
    for name, calls in captured.items():
        layer, c, (h, w) = calls[0].layer, calls[0].in_channels, calls[0].in_size
        key = (c, h, w, tuple(layer.weight.shape), layer.stride, layer.padding, layer.dilation, layer.deform_groups)
        found.setdefault(key, {
            "in_shape": (c, h, w), "weight_shape": tuple(layer.weight.shape), "stride": tuple(layer.stride),
            "padding": tuple(layer.padding), "dilation": tuple(layer.dilation),
            "deform_groups": layer.deform_groups, "layers": [],
        })["layers"].append(name)
    del model
    return list(found.values())


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench_ops(
    config: dict[str, Any], args: BenchOptions, device: torch.device, amp_dtype: torch.dtype | None
) -> list[dict[str, Any]]:
    """Forward and forward+backward ms of deform_conv2d (zero/random offsets, without/with mask) and conv2d.

    Rows share one format, ``{op, impl, shape, offsets, fwd_ms, fwd_bwd_ms, max_rel_err, err_ref, layers}``;
    another implementation of the op is another ``impl`` value. Errors are measured on the first image
    of the batch against torchvision's op in float64 (conv2d rows: the op with zero offsets and mask 1
    against float64 ``F.conv2d``, a check that both compute the same convolution).
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    channels_last = device.type == "cuda" and config["train"]["channels_last"]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format  # as the model's tensors
    n = args.batch_size
    for geo in layer_shapes(config, args.crop, device):
        c, h, w = geo["in_shape"]
        out_c, c_per_group, kh, kw = geo["weight_shape"]
        stride, padding, dilation = geo["stride"], geo["padding"], geo["dilation"]
        out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        taps = geo["deform_groups"] * kh * kw
        x = torch.randn(n, c, h, w, generator=gen).to(device).contiguous(memory_format=memory_format)
        weight = torch.randn(out_c, c_per_group, kh, kw, generator=gen) / math.sqrt(c_per_group * kh * kw)
        weight = weight.to(device).contiguous(memory_format=memory_format)
        offsets = {
            "zero": torch.zeros(n, 2 * taps, out_h, out_w, device=device),
            "random": (2.0 * torch.randn(n, 2 * taps, out_h, out_w, generator=gen)).to(device),  # a few pixels
        }
        mask = torch.sigmoid(torch.randn(n, taps, out_h, out_w, generator=gen)).to(device)
        shape = f"{n} x {c} x {h} x {w}, k{kh} d{dilation[0]}" + (f" s{stride[0]}" if stride[0] != 1 else "")
        common = {"shape": shape, "layers": geo["layers"]}
        conv_args = {"stride": stride, "padding": padding, "dilation": dilation}

        def timed(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> tuple[float, float]:
            """(forward ms, forward+backward ms) of ``fn(*inputs)`` with gradients for every input."""
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            with torch.no_grad(), autocast(device, amp_dtype):
                grad_out = torch.randn_like(fn(*inputs))

            def forward() -> None:
                with torch.no_grad(), autocast(device, amp_dtype):
                    fn(*inputs)

            def forward_backward() -> None:
                for leaf in leaves:
                    leaf.grad = None
                with autocast(device, amp_dtype):
                    out = fn(*leaves)
                out.backward(grad_out)

            return (time_each(forward, args.iters, args.warmup, device),
                    time_each(forward_backward, args.iters, args.warmup, device))

        conv = lambda x_, w_: F.conv2d(x_, w_, None, **conv_args)  # noqa: E731
        fwd, fwd_bwd = timed(conv, [x, weight])
        with torch.no_grad(), autocast(device, amp_dtype):
            zero_op = deform_conv2d(x[:1], offsets["zero"][:1], weight, None, mask=torch.ones_like(mask[:1]), **conv_args)
        reference = F.conv2d(x[:1].double(), weight.double(), None, **conv_args)
        rows.append({"op": "conv2d", "impl": "conv2d", **common, "offsets": None, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                     "max_rel_err": max_rel_err(zero_op, reference),
                     "err_ref": "deform_conv2d with zero offsets and mask 1 vs float64 conv2d"})
        for offset_name, offset in offsets.items():
            for impl_name, impl in runnable(DEFORM_IMPLS, device).items():
                for m in (None, mask):
                    def op(
                        x_: torch.Tensor, o_: torch.Tensor, w_: torch.Tensor, *rest: torch.Tensor, fn: Callable = impl
                    ) -> torch.Tensor:
                        return fn(x_, o_, w_, rest[0] if rest else None, **conv_args)

                    def reference_op(x_: torch.Tensor, o_: torch.Tensor, w_: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
                        return torchvision_deform(x_, o_, w_, rest[0] if rest else None, **conv_args)

                    inputs = [x, offset, weight] + ([m] if m is not None else [])
                    fwd, fwd_bwd = timed(op, inputs)
                    first = [t[:1] if t is not weight else t for t in inputs]  # the error on the first image
                    with torch.no_grad(), autocast(device, amp_dtype):
                        out = op(*first)
                    reference = reference_op(*[t.double() for t in first])
                    rows.append({
                        "op": "deform_conv2d", "impl": impl_name + ("+mask" if m is not None else ""), **common,
                        "offsets": offset_name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                        "max_rel_err": max_rel_err(out, reference), "err_ref": "float64 torchvision deform_conv2d",
                    })
    return rows + bench_loss_ops(config, args, device, amp_dtype, memory_format)


def bench_loss_ops(
    config: dict[str, Any], args: BenchOptions, device: torch.device, amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format,
) -> list[dict[str, Any]]:
    """Rows of the training loss (one head's logits at 1/8 of the crop, upsampled to it) for each implementation.

    The error is the larger of the loss's and the logits gradient's, against the reference loss in float64 on
    the same logits.
    """
    num_classes, side = config["model"]["num_classes"], args.crop // 8
    logits_dtype = amp_dtype or torch.float32  # the heads' logits come out of autocast in its dtype
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(args.batch_size, num_classes, side, side, generator=gen).to(device, logits_dtype)
    logits = logits.contiguous(memory_format=memory_format)
    _, labels = synthetic_batch(args.batch_size, args.crop, num_classes, device)
    reference_leaf = logits.detach().double().requires_grad_(True)
    reference = LOSS_OPS["reference"](reference_leaf, labels, IGNORE_INDEX)
    reference.backward()
    rows = []
    for impl_name, impl in runnable(LOSS_OPS, device).items():
        leaf = logits.detach().clone().requires_grad_(True)

        def forward(fn: Callable = impl) -> None:
            with torch.no_grad():
                fn(logits, labels, IGNORE_INDEX)

        def forward_backward(fn: Callable = impl) -> None:
            leaf.grad = None
            fn(leaf, labels, IGNORE_INDEX).backward()

        loss = impl(leaf, labels, IGNORE_INDEX)
        loss.backward()
        rows.append({
            "op": "upsample_cross_entropy", "impl": impl_name, "offsets": None, "layers": ["classifier", "aux_classifier"],
            "shape": f"{args.batch_size} x {num_classes} x {side} x {side} -> {args.crop} x {args.crop}",
            "fwd_ms": time_each(forward, args.iters, args.warmup, device),
            "fwd_bwd_ms": time_each(forward_backward, args.iters, args.warmup, device),
            "max_rel_err": max(max_rel_err(loss, reference), max_rel_err(leaf.grad, reference_leaf.grad)),
            "err_ref": "float64 F.interpolate + F.cross_entropy on the same logits: loss and gradient",
        })
    return rows


# -------------------------------------------------------------------------------------------------- data
def write_ade_like(root: Path, count: int, seed: int = 0) -> None:
    """``count`` 683x512 JPEG/PNG pairs of smooth random content in the ADE20K layout (training split)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    for i in range(count):
        colours = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(colours).resize((683, 512), Image.BICUBIC)
        noise = rng.normal(0, 12, (512, 683, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        classes = rng.choice(np.arange(0, 151), size=12, replace=False)  # 0 = "other", mapped to ignore
        cells = rng.choice(classes, size=(9, 12)).astype(np.uint8)
        label = Image.fromarray(cells).resize((683, 512), Image.NEAREST)
        image.save(root / "images" / "training" / f"bench_{i:05d}.jpg", quality=90)
        label.save(root / "annotations" / "training" / f"bench_{i:05d}.png")


def bench_data(args: BenchOptions, models: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Samples/s of SegmentationFolder + TrainTransform (ADE20K recipe) in one process, one thread."""
    from data.dataset import SegmentationFolder, sample_seed
    from data.transforms import TrainTransform

    data_cfg = load_config("ade20k-base")["data"]
    recipe = {k: data_cfg[k] for k in ("scale", "ratio_range", "crop_size", "cat_max_ratio", "photometric")}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_ade_") as tmp:
        write_ade_like(Path(tmp), args.data_images)
        dataset = SegmentationFolder(tmp, "training", TrainTransform(data_cfg))
        torch.set_num_threads(1)  # as a loader worker (data.dataset._worker_init)
        try:
            dataset[(0, sample_seed(0, 0))]  # file cache, lazy imports
            start = time.perf_counter()
            for p in range(args.data_samples):
                image, label, _ = dataset[(p % len(dataset), sample_seed(1, p))]
            seconds = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
    per_worker = args.data_samples / seconds
    targets = [("norm-conv on one H100 (reference figure, torch 2.11, bf16)", H100_NORM_CONV_IMAGES_PER_S)]
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        targets += [(f"{m['name']} training, this run ({gpu})", m["train_images_per_s"]) for m in models]
    return {
        "recipe": recipe,
        "images": args.data_images,
        "image_size": [683, 512],
        "samples": args.data_samples,
        "sample_shape": [list(image.shape), list(label.shape)],
        "samples_per_s_per_worker": per_worker,
        "ms_per_sample": 1000.0 / per_worker,
        "workers_needed": [
            {"target": name, "images_per_s": rate, "workers": math.ceil(rate / per_worker)} for name, rate in targets
        ],
    }


# ------------------------------------------------------------------------------------------------ output
def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(result: dict[str, Any]) -> str:
    """Markdown tables of the results."""
    s = result["settings"]
    lines = [
        f"device {result['device']}{' (' + result['gpu'] + ')' if result['gpu'] else ''}, torch {result['torch']}, "
        f"torchvision {result['torchvision']}; config {s['config']}, batch {s['batch_size']}, crop {s['crop']}, "
        f"amp {s['amp']}, channels_last {s['channels_last']}, median of {s['iters']} timed iterations after {s['warmup']} "
        f"warm-up ones",
        "",
        "| model | train img/s | × norm-conv | × reference path | infer img/s | × norm-conv | peak mem GiB (train) "
        "| × norm-conv |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        lines.append(
            f"| {m['name']} | {num(m['train_images_per_s'])} | {num(m['train_ratio'])} | {num(m['train_path_speedup'])} | "
            f"{num(m['infer_images_per_s'])} | {num(m['infer_ratio'])} | {num(m['peak_mem_gib'])} | {num(m['mem_ratio'])} |"
        )
    lines.append("(× norm-conv: against norm-conv on the same path; (fast): the Triton kernels, models/triton_*.py)")
    if result["ops"]:
        lines += ["", "| op | impl | input, kernel | offsets | fwd ms | fwd+bwd ms | max rel err |", "|" + "---|" * 7]
        for r in result["ops"]:
            lines.append(
                f"| {r['op']} | {r['impl']} | {r['shape']} | {r['offsets'] or '-'} | {num(r['fwd_ms'], 3)} | "
                f"{num(r['fwd_bwd_ms'], 3)} | {r['max_rel_err']:.1e} |"
            )
        lines.append(
            "(max rel err: conv2d rows, deform_conv2d with zero offsets and mask 1 vs float64 conv2d; deform_conv2d rows "
            "vs float64 torchvision deform_conv2d on the same inputs; upsample_cross_entropy rows, loss and gradient vs "
            "the float64 reference)"
        )
    if result["data"]:
        d = result["data"]
        lines += [
            "",
            f"data: SegmentationFolder + TrainTransform (ADE20K recipe, crop {d['recipe']['crop_size']}) on "
            f"{d['images']} generated 683x512 images: {d['samples_per_s_per_worker']:.1f} samples/s per worker "
            f"({d['ms_per_sample']:.1f} ms per sample, one process, one thread)",
        ]
        for t in d["workers_needed"]:
            lines.append(f"- {t['target']}: {t['images_per_s']:.1f} img/s needs {t['workers']} loader workers (cores)")
    return "\n".join(lines) + "\n"


def benchmark(args: BenchOptions) -> dict[str, Any]:
    """Run the benchmarks ``args`` asks for (progress on stderr); return the results (``report`` formats them)."""
    device, variants, paths = check_options(args)
    config = load_config(args.config, args.overrides)
    amp_name = (args.amp or config["train"]["amp"]) if device.type == "cuda" else "none"  # autocast is CUDA only
    amp_dtype = AMP_DTYPES[amp_name]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {
        "device": device.type,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "settings": {
            "config": config["config_name"], "overrides": args.overrides, "batch_size": args.batch_size,
            "crop": args.crop, "amp": amp_name, "channels_last": device.type == "cuda" and config["train"]["channels_last"],
            "compile": config["train"]["compile"], "aux_head": config["model"]["aux_head"],
            "deform_stages": config["model"]["deform"]["stages"], "deform_blocks": config["model"]["deform"]["blocks"],
            "iters": args.iters, "warmup": args.warmup, "paths": paths,
            "timing": "median of single synchronised iterations, variants interleaved",
            "cpu_threads": torch.get_num_threads(),
        },
        "models": [],
        "ops": [],
        "data": {},
    }
    runs = [(v, p) for p in paths for v in variants]
    names = [VARIANTS[v][0] + ("" if p == "reference" else f" ({p})") for v, p in runs]
    print(f"benchmarking {', '.join(names)} ...", file=sys.stderr)
    configs = [(name, variant_config(config, VARIANTS[v][1], p)) for name, (v, p) in zip(names, runs)]
    result["models"] = bench_models(configs, args, device, amp_dtype)
    for record, (v, p) in zip(result["models"], runs):
        record["deform_version"], record["path"] = VARIANTS[v][1], p
    add_ratios(result["models"])
    if args.ops:
        print("benchmarking deform_conv2d vs conv2d, and the loss ...", file=sys.stderr)
        result["ops"] = bench_ops(config, args, device, amp_dtype)
    if args.data:
        print("benchmarking the data pipeline ...", file=sys.stderr)
        result["data"] = bench_data(args, result["models"], device)
    return result
