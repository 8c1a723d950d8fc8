"""Benchmarks of norm-conv, def-conv-v1 and def-conv-v2 on ``torch.utils.benchmark``: speed, memory and the ops.

A case is the config with ``model.deform.version`` 0, 1 or 2, random weights and a synthetic batch, set up as
train.py sets it up and resolved for the device by ``engine.device``; its training step is
``engine.optim.train_step`` itself (aux head, loss, backward, SGD step) and its inference is
``engine.inference.predict_logits`` (whole image, logits upsampled as evaluation does). ``Timer`` synchronises
the GPU and reports medians; the cases are timed in alternating rounds, so that a change in machine load hits
all of them alike. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step after a warm-up one;
on the CPU the peak resident size of a fresh process that runs only that case (``process_peak``), which also
counts the interpreter and torch's libraries (Linux: its VmHWM); there bf16 and fp16 run CPU autocast with
torchvision's CUDA autocast rule for the deformable op (``deform_in_fp32_under_cpu_autocast``, registered in that
process only): the memory table's CPU stand-in for the GPU's autocast. The speed and op cases have no such rule, and
torchvision no bf16 or fp16 CPU kernel: scripts/benchmark.py runs them on the CPU in fp32 only.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data import IGNORE_INDEX
from engine.device import AMP_DTYPES, AUTOCAST, memory_format, resolve_amp, resolve_config
from engine.diagnosis import DeviceInfo
from engine.inference import predict_logits
from engine.loss import reference_upsample_cross_entropy, upsample_cross_entropy
from engine.memory import CARDS_GIB, fewest_that_fit
from engine.offsets import capture_offsets
from engine.optim import build_optimizer, train_step
from models.deform_conv import DEFORM_OPS
from models.segmentor import build_model

VARIANTS = {"norm": ("norm-conv", 0), "v1": ("def-conv-v1", 1), "v2": ("def-conv-v2", 2)}
PATHS = ("reference", "triton")  # model.deform_op and train.loss_op together
GIB = 2**30
RECIPE_BATCH = 16


def run_amp(name: str, device: torch.device, device_info: DeviceInfo) -> str:
    """``train.amp`` as a benchmark runs it: ``resolve_amp``'s rule, except that on the CPU an explicit bf16 or fp16
    is kept. That is CPU autocast, which train.py never uses: the memory table's CPU stand-in for bf16."""
    if device.type == "cpu" and name in ("bf16", "fp16"):
        return name
    return resolve_amp(name, device.type, device_info.capability)


@functools.cache
def deform_in_fp32_under_cpu_autocast() -> torch.library.Library:
    """Give CPU autocast torchvision's CUDA autocast rule for its deformable op: compute in fp32, return the input's
    dtype (torchvision has no bf16 CPU kernel, and registers the rule for CUDA only). For the rest of the process."""
    library = torch.library.Library("torchvision", "IMPL")

    def in_fp32(input: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor, *geometry: Any) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            out = torch.ops.torchvision.deform_conv2d(input.float(), weight.float(), offset.float(), mask.float(),
                                                      bias.float(), *geometry)
        return out.to(input.dtype)

    library.impl("deform_conv2d", in_fp32, "AutocastCPU")
    return library


def case_config(config: dict[str, Any], version: int, path: str, amp: str, device: torch.device,
                device_info: DeviceInfo) -> dict[str, Any]:
    """``config`` resolved for ``device`` with ``model.deform.version``, both ops and ``train.amp`` (as ``run_amp``
    gives it) set, one micro-batch per step, and no ImageNet download (random weights)."""
    config = copy.deepcopy(config)
    config["model"]["deform"]["version"] = version
    config["model"]["pretrained_backbone"] = False
    config["model"]["deform_op"] = config["train"]["loss_op"] = path
    config["train"]["amp"] = "none"  # replaced by amp below; resolve_config settles the layout and the ops
    config["train"]["accum_steps"] = 1  # a case's batch is one forward
    config = resolve_config(config, device, device_info)
    config["train"]["amp"] = amp
    return config


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, device: torch.device,
                    layout: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised random images and labels in 0..num_classes-1 with about 10% ignored (255) pixels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=gen)
    labels = torch.randint(0, num_classes, (batch, *size), generator=gen)
    labels[torch.rand(batch, *size, generator=gen) < 0.1] = IGNORE_INDEX
    return images.to(device).contiguous(memory_format=layout), labels.to(device)


class TrainingCase:
    """One resolved config set up as train.py sets it up, with a synthetic ``batch`` x ``crop`` x ``crop`` batch."""

    def __init__(self, config: dict[str, Any], device: torch.device, batch: int, crop: int) -> None:
        self.config, self.device, tcfg = config, device, config["train"]
        self.base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        layout = memory_format(tcfg["channels_last"])
        torch.manual_seed(0)
        self.model = build_model(config, load_pretrained=False)[0].to(device, memory_format=layout)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=tcfg["amp"] == "fp16")
        self.net = torch.compile(self.model) if tcfg["compile"] else self.model
        self.images, self.labels = synthetic_batch(batch, (crop, crop), config["model"]["num_classes"], device, layout)

    def train(self) -> dict[str, torch.Tensor]:
        """One ``train_step``; its losses."""
        self.model.train()
        return train_step(self.net, self.optimizer, self.scaler, self.images, self.labels, self.config)

    def infer(self) -> None:
        """Whole-image logits at the input size, as evaluation computes them (uncompiled, as evaluation runs)."""
        self.model.eval()
        amp = self.config["train"]["amp"]
        with torch.inference_mode(), torch.autocast(self.device.type, **AUTOCAST[amp]):
            predict_logits(self.model, self.images, tuple(self.images.shape[-2:]))

    def peak_bytes(self) -> int | None:
        """CUDA bytes this case holds at the peak of a training step (after a warm-up step); None on the CPU."""
        if self.device.type != "cuda":
            return None
        self.train()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.train()
        return torch.cuda.max_memory_allocated(self.device) - self.base


def seconds_per_call(calls: dict[str, Callable[[], Any]], rounds: int, min_run_time: float) -> dict[str, float]:
    """Median seconds per call of each function, from ``rounds`` alternating rounds of ``blocked_autorange``."""
    # Imported here, with torch's C++-extension logger quieted: importing torch.utils.benchmark loads that module,
    # which warns "No CUDA runtime is found, using CUDA_HOME=..." on any machine without a GPU (no C++ is built here).
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Measurement, Timer

    threads = torch.get_num_threads()
    timers = {name: Timer("call()", globals={"call": call}, num_threads=threads) for name, call in calls.items()}
    found: dict[str, list[Measurement]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, timer in timers.items():
            found[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    return {name: Measurement.merge(measurements)[0].median for name, measurements in found.items()}


def _peak_in_child(fn: Callable[..., Any], args: tuple) -> int:
    fn(*args)
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024  # kB


def process_peak(fn: Callable[..., Any], *args: Any) -> int:
    """Peak resident bytes of a fresh Python process that runs ``fn(*args)`` (a module-level function).

    Linux's VmHWM of the child: getrusage's ru_maxrss would also count the parent's peak (it survives the exec).
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(_peak_in_child, fn, args).result()


def cpu_training_peak(config: dict[str, Any], batch: int, crop: int) -> None:
    """Two training steps of ``config`` on the CPU (the second has the optimizer's momentum), for ``process_peak``
    (in a process of its own: CPU autocast gets the deformable op's CUDA rule there)."""
    if config["train"]["amp"] != "none":
        deform_in_fp32_under_cpu_autocast()
    case = TrainingCase(config, torch.device("cpu"), batch, crop)
    case.train()
    case.train()


def training_peak(config: dict[str, Any], device: torch.device, batch: int, crop: int) -> int:
    """Peak bytes of a training step of ``config``: CUDA allocations, or the CPU process peak."""
    if device.type == "cpu":
        return process_peak(cpu_training_peak, config, batch, crop)
    case = TrainingCase(config, device, batch, crop)
    try:
        return case.peak_bytes()
    finally:
        del case
        torch.cuda.empty_cache()


def memory_fit(peaks: dict[int, int]) -> dict[str, Any]:
    """Per-image bytes (the slope between the two batch sizes) and the fixed part, and per card the fewest
    accepted ``train.accum_steps`` with which the recipe's batch of 16 fits (None: not even 2 images at a time)."""
    (b1, p1), (b2, p2) = sorted(peaks.items())
    slope = (p2 - p1) / (b2 - b1)
    fixed = p1 - slope * b1
    accum = {card: fewest_that_fit(lambda b: (fixed + slope * b) / GIB, RECIPE_BATCH, 1, card) for card in CARDS_GIB}
    return {"per_image_gib": slope / GIB, "fixed_gib": fixed / GIB, "accum_steps": accum}


def layer_geometries(config: dict[str, Any], crop: int, device: torch.device) -> list[dict[str, Any]]:
    """The distinct geometries of the v2 model's deformable layers at a ``crop`` input, with their layer names."""
    v2 = copy.deepcopy(config)
    v2["model"]["deform"]["version"] = 2
    model = build_model(v2, load_pretrained=False)[0].to(device).eval()
    found: dict[tuple, dict[str, Any]] = {}
    with torch.inference_mode(), capture_offsets(model) as captured:
        model(torch.zeros(1, 3, crop, crop, device=device))
    for name, calls in captured.items():
        layer = calls[0].layer
        geometry = {"in_shape": (calls[0].in_channels, *calls[0].in_size),
                    "out_size": tuple(calls[0].offsets.shape[-2:]), "weight_shape": tuple(layer.weight.shape),
                    "stride": tuple(layer.stride), "padding": tuple(layer.padding), "dilation": tuple(layer.dilation),
                    "deform_groups": layer.deform_groups}
        found.setdefault(tuple(geometry.items()), {**geometry, "layers": []})["layers"].append(name)
    return list(found.values())


def deform_inputs(geometry: dict[str, Any], batch: int, device: torch.device, amp: str) -> dict[str, torch.Tensor]:
    """Input, offsets (a few pixels), weight and mask of a layer as the model feeds them under ``amp``: all in the
    autocast dtype but the fp32 weight, in the training layout (channels_last on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    (c, h, w), (out_h, out_w) = geometry["in_shape"], geometry["out_size"]
    out_c, per_group, kh, kw = geometry["weight_shape"]
    taps = geometry["deform_groups"] * kh * kw
    dtype, layout = AMP_DTYPES[amp], memory_format(device.type == "cuda")
    tensors = {"input": torch.randn(batch, c, h, w, generator=gen),
               "offset": 2 * torch.randn(batch, 2 * taps, out_h, out_w, generator=gen),
               "weight": torch.randn(out_c, per_group, kh, kw, generator=gen) / math.sqrt(per_group * kh * kw),
               "mask": torch.rand(batch, taps, out_h, out_w, generator=gen)}
    return {name: t.to(device, torch.float32 if name == "weight" else dtype).contiguous(memory_format=layout)
            for name, t in tensors.items()}


def conv_op(op: Callable[..., torch.Tensor], geometry: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """``op`` (F.conv2d or a deformable op) with the stride, padding and dilation of ``geometry``."""
    return functools.partial(op, **{key: geometry[key] for key in ("stride", "padding", "dilation")})


def loss_inputs(batch: int, crop: int, num_classes: int, device: torch.device, amp: str) -> dict[str, torch.Tensor]:
    """One head's logits at 1/8 of ``crop`` in the autocast dtype (channels_last on CUDA) and labels at ``crop``."""
    layout = memory_format(device.type == "cuda")
    labels = synthetic_batch(batch, (crop, crop), num_classes, device, layout)[1]
    logits = 3 * torch.randn(batch, num_classes, crop // 8, crop // 8, generator=torch.Generator().manual_seed(1))
    return {"logits": logits.to(device, AMP_DTYPES[amp]).contiguous(memory_format=layout),
            "labels": labels}


def max_rel_err(value: torch.Tensor, exact: torch.Tensor) -> float:
    """``max|value - exact| / max|exact|`` in float64."""
    value, exact = value.detach().double(), exact.detach()
    return float((value - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


def op_errors(call: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
              inputs: dict[str, torch.Tensor], device: torch.device, amp: str) -> dict[str, float]:
    """Max relative errors of ``call(**inputs)`` under ``amp``'s autocast and of its gradients w.r.t. the floating
    inputs (for one random output gradient), against ``reference`` in float64 on the same input values."""
    leaves = {k: t.detach().clone().requires_grad_() if t.is_floating_point() else t for k, t in inputs.items()}
    exact_leaves = {k: t.detach().double().requires_grad_() if t.is_floating_point() else t for k, t in inputs.items()}
    with torch.autocast(device.type, **AUTOCAST[amp]):
        out = call(**leaves)
    exact = reference(**exact_leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    names = [k for k, t in inputs.items() if t.is_floating_point()]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], grad_out.to(out.dtype))
    exact_grads = torch.autograd.grad(exact, [exact_leaves[k] for k in names], grad_out.double())
    errors = {"output": max_rel_err(out, exact)}
    return errors | {f"grad {name}": max_rel_err(g, e) for name, g, e in zip(names, grads, exact_grads)}


def op_rows(config: dict[str, Any], paths: list[str], batch: int, crop: int, device: torch.device, amp: str,
            rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    """Forward and forward+backward ms and errors against float64 of a plain conv and the deformable op (v1, v2) at
    each of the model's deformable layer geometries, and of the loss, for the implementations of ``paths``."""
    row = functools.partial(_op_row, device=device, amp=amp, rounds=rounds, min_run_time=min_run_time)
    rows = []
    for geometry in layer_geometries(config, crop, device):
        inputs = deform_inputs(geometry, batch, device, amp)
        shape = f"{batch} x {' x '.join(map(str, geometry['in_shape']))}, dilation {geometry['dilation'][0]}"
        conv = conv_op(F.conv2d, geometry)
        rows.append(row("conv2d", "F.conv2d", shape, conv, conv, {k: inputs[k] for k in ("input", "weight")}))
        for path in paths:
            deform, exact = conv_op(DEFORM_OPS[path], geometry), conv_op(DEFORM_OPS["reference"], geometry)
            v1 = {k: t for k, t in inputs.items() if k != "mask"}
            rows += [row("deform_conv2d v1", path, shape, deform, exact, v1),
                     row("deform_conv2d v2", path, shape, deform, exact, inputs)]
    inputs = loss_inputs(batch, crop, config["model"]["num_classes"], device, amp)
    shape = f"{' x '.join(map(str, inputs['logits'].shape))} -> {crop} x {crop}"
    for path in paths:
        call = functools.partial(upsample_cross_entropy, op=path)
        exact = reference_upsample_cross_entropy
        rows.append(row("upsample_cross_entropy", path, shape, call, exact, inputs, amp="none"))  # as in train_step
    return rows


def _op_row(op: str, impl: str, shape: str, call: Callable, exact: Callable, inputs: dict[str, torch.Tensor],
            device: torch.device, amp: str, rounds: int, min_run_time: float) -> dict[str, Any]:
    """One row of ``op_rows``: the times and the errors of ``call``."""
    leaves = {k: t.detach().clone().requires_grad_(t.is_floating_point()) for k, t in inputs.items()}

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, **AUTOCAST[amp]):
            call(**inputs)

    def forward_backward() -> None:
        with torch.autocast(device.type, **AUTOCAST[amp]):
            out = call(**leaves)
        out.float().sum().backward()

    times = seconds_per_call({"fwd": forward, "fwd+bwd": forward_backward}, rounds, min_run_time)
    errors = op_errors(call, exact, inputs, device, amp)
    return {"op": op, "impl": impl, "shape": shape, "fwd_ms": 1000 * times["fwd"],
            "fwd_bwd_ms": 1000 * times["fwd+bwd"], "max_rel_err": max(errors.values()), "errors": errors}


def model_rows(config: dict[str, Any], variants: list[str], paths: list[str], amps: list[str], device: torch.device,
               device_info: DeviceInfo, batch: int, crop: int, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    """Training and inference images/s and the training step's peak CUDA memory of every case, all cases resident
    and timed in alternating rounds; ``× norm-conv`` within a path and precision, ``× reference`` within a model."""
    rows, calls = [], {}
    for amp in amps:
        for path in paths:
            for variant in variants:
                name, version = VARIANTS[variant]
                case = TrainingCase(case_config(config, version, path, amp, device, device_info), device, batch, crop)
                peak = case.peak_bytes()
                rows.append({"name": name, "version": version, "path": path, "amp": case.config["train"]["amp"],
                             "peak_gib": None if peak is None else peak / GIB})
                calls[f"{len(rows)} train"], calls[f"{len(rows)} infer"] = case.train, case.infer
    times = seconds_per_call(calls, rounds, min_run_time)
    for i, row in enumerate(rows, 1):
        row["train_images_per_s"], row["infer_images_per_s"] = batch / times[f"{i} train"], batch / times[f"{i} infer"]
    for row in rows:
        same_amp = [r for r in rows if r["amp"] == row["amp"]]
        norm = [r for r in same_amp if r["version"] == 0 and r["path"] == row["path"]]
        ref = [r for r in same_amp if r["version"] == row["version"] and r["path"] == "reference"]
        for key in ("train", "infer"):
            speed = row[f"{key}_images_per_s"]
            row[f"{key}_x_norm"] = speed / norm[0][f"{key}_images_per_s"] if norm else None
            row[f"{key}_x_reference"] = speed / ref[0][f"{key}_images_per_s"] if ref else None
    return rows


def memory_rows(config: dict[str, Any], variants: list[str], amps: list[str], batches: tuple[int, int],
                device: torch.device, device_info: DeviceInfo, crop: int) -> list[dict[str, Any]]:
    """Peak of one training step (reference path) per variant and precision at two batch sizes, one case at a
    time, with ``memory_fit``'s per-image cost and the accumulation each card needs; ``error`` where a case fails."""
    rows = []
    for variant in variants:
        for amp in amps:
            name, version = VARIANTS[variant]
            row: dict[str, Any] = {"name": name, "amp": amp, "crop": crop}
            try:
                case = case_config(config, version, "reference", amp, device, device_info)
                peaks = {b: training_peak(case, device, b, crop) for b in batches}
            except RuntimeError as err:  # CUDA out of memory; a CPU case's process that failed or died
                rows.append(row | {"error": " ".join(str(err).split())[:200]})
                continue
            rows.append(row | {"peak_gib": {b: p / GIB for b, p in peaks.items()}} | memory_fit(peaks))
    return rows
