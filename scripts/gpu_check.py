"""First run on a new machine: does every training, evaluation and fast path work on this GPU, and how fast?

It plans before it spends. At the recipe's shapes (global batch 16, 512x512 crops, aux head), the default set runs
one training step (engine.optim.train_step, after a warm-up step, then timed) of norm-conv, def-conv-v1 and
def-conv-v2 in the precision train.amp=auto picks, and def-conv-v2 in fp32; the Triton ops against float64 (values
and gradients, within TOLERANCES); a whole-image and a slide evaluation of a 512x2048 image; def-conv-v2 on the
Triton path; and one torch.compile of def-conv-v2. --full runs every combination (every precision the GPU has,
both layouts, every model on every path, the reference ops too, four compiled models).

Each training case takes the fewest micro-batches (train.accum_steps) with which the memory table (engine/memory.py,
shown in docs/gpu-and-clusters.md) says the batch of 16 fits the card (more where it still runs out of memory, as
train.accum_steps=auto does); a case that cannot fit even at 2 images per forward is reported as "no fit" with the
memory it needs. --plan prints the cases, their batch split and estimated time without running anything (no GPU
needed: give --memory-gib).

Each case runs on its own (a failure is a row of the table, not the end of the check); the table is rewritten to
--out/gpu_check.json after every case. Exit status: 0 every case that fits passed, 1 a failure or a mismatch, 2 no
usable CUDA here or bad arguments.

    python scripts/gpu_check.py --plan --memory-gib 16,24,40,80     # what it would run, on four cards
    python scripts/gpu_check.py                                     # writes runs/gpu_check/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from configs import MIN_PER_FORWARD, UserError, load_config
from engine.benchmark import (GIB, PATHS, VARIANTS, TrainingCase, case_config, conv_op, deform_inputs, loss_inputs,
                              op_errors, seconds_per_call)
from engine.console import command_line, positive_numbers
from engine.device import AUTOCAST, describe_device, memory_format, resolve_amp
from engine.diagnosis import DeviceInfo, cuda_unusable_message, cuda_usable, read_device_info, with_nvidia_smi
from engine.inference import predict_logits
from engine.loss import reference_upsample_cross_entropy, upsample_cross_entropy
from engine.memory import CARD_SHARE, accum_choices, fewest_that_fit, is_out_of_memory, memory_gib, step_gib
from engine.workdir import make_writable_folder, write_json
from models.deform_conv import DEFORM_OPS
from models.segmentor import build_model
from models.triton_support import triton_available

CONFIG = "def-conv-v2.yaml"  # the recipe; the variants change model.deform.version
# batch, crop, evaluated image (height, width), the ops' batch (their errors do not depend on it), channels of the
# deformable op (layer4's conv2), timing per case.
RECIPE = {"batch": 16, "crop": 512, "eval_size": (512, 2048), "op_batch": 2, "width": 512, "min_run_time": 0.5}
# The largest max relative error (max|a - b| / max|b|, over the output and every gradient) of an op against float64
# on the same inputs: the CPU tests' (tests/test_triton_*.py), but 1e-4 for the fp32 loss (1e-5 there, on sums over
# far fewer pixels). bf16/fp16 keep 8/11 significant bits: the deformable op rounds its operands, the loss its
# gradient, once.
TOLERANCES = {"deform": {"none": 1e-4, "bf16": 3e-2, "fp16": 5e-3}, "loss": {"none": 1e-4, "bf16": 1e-2, "fp16": 1e-2}}
# Seconds per case on an H100, estimated (no GPU has run this check yet; the JSON records what each case took):
#   train    the model built and moved (2 s), cuDNN's autotuning in the first step (5 s), then a warm-up, a measured
#            and at least two timed steps of the batch of 16 at up to 1 s each (4 s), freeing memory (1 s)
#   triton   as train, plus the Triton JIT of the kernels the op cases did not compile (4 s)
#   compile  one cold torch.compile of the model's forward and backward (60 s), then as train
#   op       inputs and the float64 reference at 2 images (2 s); Triton's JIT of the op's kernels (4 s)
#   eval     the model built (2 s), one 512x2048 image whole or in slide windows, at least three times (3 s)
ESTIMATE_S = {"train": 12, "triton": 16, "compile": 72, "op reference": 2, "op triton": 6, "eval": 5}
BUDGET_S = 180  # the default set's estimate on an H100 stays under this (tests/test_gpu_check.py)


def precisions(capability: tuple[int, int] | None) -> list[str]:
    """The precisions a GPU of ``capability`` runs, train.amp=auto's first: bf16 where ``resolve_amp`` allows it,
    fp16, none."""
    return (["bf16"] if resolve_amp("auto", "cuda", capability) == "bf16" else []) + ["fp16", "none"]


def check_cases(capability: tuple[int, int] | None, full: bool = False) -> list[dict[str, Any]]:
    """The cases for a GPU of ``capability``, the quick ones first (torch.compile's last): the default set, or
    every combination (``full``)."""
    amps = precisions(capability)
    auto = amps[0]

    def train(variant: str, amp: str, channels_last: bool = True, path: str = "reference", compile: bool = False) -> dict:
        layout = "channels_last" if channels_last else "contiguous"
        name = f"train {VARIANTS[variant][0]} {amp} {layout}{' ' + path if path != 'reference' else ''}"
        return {"kind": "train", "name": name + (" compile" if compile else ""), "variant": variant, "amp": amp,
                "channels_last": channels_last, "path": path, "compile": compile}

    def op(name: str, impl: str, amp: str) -> dict:
        return {"kind": "op", "name": f"{name} {impl} {amp}", "op": name, "impl": impl, "amp": amp}

    def evaluation(variant: str, mode: str) -> dict:
        return {"kind": "eval", "name": f"eval {VARIANTS[variant][0]} {mode} {auto}", "variant": variant, "mode": mode,
                "amp": auto}

    ops = ("deform v1", "deform v2", "loss")
    if not full:
        return ([train(v, auto) for v in VARIANTS] + [train("v2", "none")] + [op(o, "triton", auto) for o in ops]
                + [evaluation("v2", mode) for mode in ("whole", "slide")]
                + [train("v2", auto, path="triton"), train("v2", auto, compile=True)])
    cases = [train(v, amp, cl) for v in VARIANTS for amp in amps for cl in (True, False)]
    cases += [op(o, impl, amp) for o in ops for amp in amps for impl in PATHS]
    cases += [evaluation(v, mode) for v in VARIANTS for mode in ("whole", "slide")]
    cases += [train(v, auto, path="triton") for v in VARIANTS]
    cases += [train(v, auto, compile=True) for v in VARIANTS]
    return cases + [train("v2", auto, path="triton", compile=True)]


def estimate_s(case: dict[str, Any]) -> int:
    """The case's estimated seconds on an H100 (``ESTIMATE_S``)."""
    if case["kind"] == "train":
        return ESTIMATE_S["compile" if case["compile"] else "triton" if case["path"] == "triton" else "train"]
    return ESTIMATE_S[f"op {case['impl']}"] if case["kind"] == "op" else ESTIMATE_S["eval"]


def counted(case: dict[str, Any], accum: int | None) -> bool:
    """Whether a case counts toward the estimated time: every case but a training one that does not fit (``accum``
    None)."""
    return case["kind"] != "train" or accum is not None


def plan_case(case: dict[str, Any], memory: float, shapes: dict[str, Any]) -> dict[str, Any]:
    """How a case runs on a card of ``memory`` GiB: for training, ``accum`` (the fewest train.accum_steps the memory
    table says fit; None: not even at 2 images per forward) and ``need_gib`` (the table's estimate of that step)."""
    if case["kind"] != "train":
        return {"accum": None, "need_gib": None}
    batch, crop, version = shapes["batch"], shapes["crop"], VARIANTS[case["variant"]][1]
    need = functools.partial(step_gib, version, case["amp"], crop)
    accum = fewest_that_fit(need, batch, 1, memory)
    return {"accum": accum, "need_gib": need(batch // accum if accum else MIN_PER_FORWARD)}


def plan_cell(case: dict[str, Any], planned: dict[str, Any], shapes: dict[str, Any]) -> str:
    """A case's plan in words: ``8x2 (14.5)``, ``no fit (needs 4.6)``, or ``-`` where memory is not planned."""
    if case["kind"] != "train":
        return "-"
    if planned["accum"] is None:
        return f"no fit (needs {planned['need_gib']:.1f})"
    return f"{shapes['batch'] // planned['accum']}x{planned['accum']} ({planned['need_gib']:.1f})"


def plan_table(cases: list[dict[str, Any]], memories: list[float], shapes: dict[str, Any]) -> str:
    """The plan for cards of ``memories`` GiB: per case its batch split and estimated GiB on each, and its seconds;
    the estimated total of the cases that fit."""
    width = max(len(case["name"]) for case in cases) + 2
    lines = [f"{'case':<{width}}" + "".join(f"{f'{m:g} GiB':<18}" for m in memories) + f"{'est. s':>6}"]
    totals = dict.fromkeys(memories, 0)
    for case in cases:
        planned = {m: plan_case(case, m, shapes) for m in memories}
        lines.append(f"{case['name']:<{width}}" + "".join(f"{plan_cell(case, planned[m], shapes):<18}" for m in memories)
                     + f"{estimate_s(case):>6}")
        for m in memories:
            totals[m] += estimate_s(case) if counted(case, planned[m]["accum"]) else 0
    lines.append(f"{'estimated time':<{width}}" + "".join(f"{_minutes(totals[m]):<18}" for m in memories))
    lines.append(f"cells: images per forward x train.accum_steps (the step's GiB by the memory table in "
                 f"docs/gpu-and-clusters.md, at most {CARD_SHARE:.0%} of the card)\nseconds: estimates for an H100, not "
                 f"measured (ESTIMATE_S in scripts/gpu_check.py)")
    return "\n".join(line.rstrip() for line in lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _need_triton(path: str, device: torch.device) -> None:
    """An error (the case's FAIL row) where ``path`` is the Triton one and its kernels cannot run on ``device``."""
    if path == "triton" and not triton_available(device):
        raise RuntimeError("the Triton kernels cannot run here (Triton 3.2 or newer on CUDA)")


def _config(case: dict[str, Any], device: torch.device, device_info: DeviceInfo) -> dict[str, Any]:
    """The recipe's config for ``case``, resolved for ``device``; an error where the Triton path cannot run."""
    _need_triton(case.get("path", "reference"), device)
    config = load_config(CONFIG)
    config["train"]["channels_last"] = case.get("channels_last", True)
    config["train"]["compile"] = case.get("compile", False)
    return case_config(config, VARIANTS[case["variant"]][1], case.get("path", "reference"), case["amp"], device, device_info)


def train_case(case: dict[str, Any], device: torch.device, device_info: DeviceInfo, shapes: dict[str, Any]) -> dict:
    """A warm-up step and a measured one (finite losses, the peak), then the time per step, with the planned
    micro-batches or, where that runs out of memory, the next accepted number (as train.accum_steps=auto)."""
    config, batch = _config(case, device, device_info), shapes["batch"]
    for accum in [n for n in accum_choices(batch, 1) if n >= case["accum"]]:
        config["train"]["accum_steps"] = accum
        try:
            return _train_row(config, device, shapes, case["accum"])
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
        gc.collect()
        torch.cuda.empty_cache()
    return {"status": "no fit", "detail": f"out of memory even at {batch // accum} images per forward"}


def _train_row(config: dict[str, Any], device: torch.device, shapes: dict[str, Any], planned: int) -> dict:
    """One training case's row at the config's train.accum_steps (``planned``: the plan's)."""
    if config["train"]["compile"]:
        torch.compiler.reset()
    accum, batch = config["train"]["accum_steps"], shapes["batch"]
    split = f"{batch // accum}x{accum}" + (f" (planned {batch // planned}x{planned})" if accum != planned else "")
    step = TrainingCase(config, device, batch, shapes["crop"])
    peak = step.peak_bytes()
    losses = step.train()
    if not all(torch.isfinite(value) for value in losses.values()):
        return {"status": "mismatch", "detail": f"{split}: non-finite loss {({k: float(v) for k, v in losses.items()})}"}
    seconds = seconds_per_call({"train": step.train}, 1, shapes["min_run_time"])["train"]
    return {"status": "ok", "images_per_s": batch / seconds, "peak_gib": None if peak is None else peak / GIB,
            "detail": f"{split}: loss {float(losses['total']):.3f}"}


def op_case(case: dict[str, Any], device: torch.device, device_info: DeviceInfo, shapes: dict[str, Any]) -> dict:
    """The op's output and gradients against float64 on the same inputs, at layer4's conv2 / the heads' logits."""
    impl, amp, batch, crop = case["impl"], case["amp"], shapes["op_batch"], shapes["crop"]
    _need_triton(impl, device)
    if case["op"] == "loss":  # as in train_step: the loss runs outside autocast, on the heads' logits
        inputs = loss_inputs(batch, crop, 150, device, amp)
        call = functools.partial(upsample_cross_entropy, op=impl)
        errors = op_errors(call, reference_upsample_cross_entropy, inputs, device, "none")
    else:
        width = shapes["width"]
        geometry = {"in_shape": (width, crop // 8, crop // 8), "out_size": (crop // 8, crop // 8), "stride": (1, 1),
                    "weight_shape": (width, width, 3, 3), "padding": (4, 4), "dilation": (4, 4),
                    "deform_groups": 1}  # layer4.1 and layer4.2's conv2
        inputs = deform_inputs(geometry, batch, device, amp)
        if case["op"] == "deform v1":
            del inputs["mask"]
        errors = op_errors(conv_op(DEFORM_OPS[impl], geometry), conv_op(DEFORM_OPS["reference"], geometry), inputs,
                           device, amp)
    tolerance = TOLERANCES[case["op"].split()[0]][amp]
    worst = max(errors.values())
    return {"status": "ok" if worst <= tolerance else "mismatch",
            "detail": f"max rel err {worst:.1e} (tolerance {tolerance:.0e}): "
                      + ", ".join(f"{name} {value:.1e}" for name, value in errors.items())}


def eval_case(case: dict[str, Any], device: torch.device, device_info: DeviceInfo, shapes: dict[str, Any]) -> dict:
    """``predict_logits`` of one image (whole or slide windows of the crop), as evaluation runs it."""
    config, size = _config(case, device, device_info), shapes["eval_size"]
    amp = config["train"]["amp"]
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    layout = memory_format(config["train"]["channels_last"])
    model = build_model(config, load_pretrained=False)[0].to(device, memory_format=layout).eval()
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    image = image.contiguous(memory_format=layout)

    def predict() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, **AUTOCAST[amp]):
            return predict_logits(model, image, size, case["mode"], crop=shapes["crop"], stride=shapes["crop"] * 2 // 3)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scores = predict()
    peak = (torch.cuda.max_memory_allocated(device) - base) / GIB if device.type == "cuda" else None
    if scores.shape != (1, 150, *size) or not torch.isfinite(scores).all():
        return {"status": "mismatch", "detail": f"scores of shape {tuple(scores.shape)}, finite: "
                                                f"{bool(torch.isfinite(scores).all())}"}
    seconds = seconds_per_call({"eval": predict}, 1, shapes["min_run_time"])["eval"]
    return {"status": "ok", "images_per_s": 1 / seconds, "peak_gib": peak, "detail": ""}


RUNNERS = {"train": train_case, "op": op_case, "eval": eval_case}


def run_case(case: dict[str, Any], device: torch.device, device_info: DeviceInfo, shapes: dict[str, Any]) -> dict:
    """One case's row of the table; a failure becomes the row (FAIL and the error), never an exception; a training
    case the plan says cannot fit is not run ("no fit")."""
    start = time.perf_counter()
    try:
        if case["kind"] == "train" and case["accum"] is None:
            row = {"status": "no fit", "detail": f"needs {case['need_gib']:.1f} GiB at {MIN_PER_FORWARD} images per "
                                                 f"forward (the memory table in docs/gpu-and-clusters.md)"}
        else:
            row = RUNNERS[case["kind"]](case, device, device_info, shapes)
    except Exception as err:  # noqa: BLE001 - every failure is a finding of the check, reported in its row
        row = {"status": "FAIL", "detail": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": case["name"], "images_per_s": None, "peak_gib": None, **row,
            "seconds": time.perf_counter() - start}


def format_row(row: dict[str, Any]) -> str:
    """One line of the table."""
    speed = "-" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}"
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
    return f"{row['case']:<52} {row['status']:<8} {speed:>8} {peak:>8} {row['seconds']:>6.1f}  {row['detail']}"


def run_checks(cases: list[dict[str, Any]], device: torch.device, device_info: DeviceInfo, shapes: dict[str, Any],
               memory: float, out: Path) -> list[dict[str, Any]]:
    """Plan every case for a card of ``memory`` GiB, run it, print the table line by line and rewrite
    ``out``/gpu_check.json after each case."""
    cases = [case | plan_case(case, memory, shapes) for case in cases]
    estimate = sum(estimate_s(case) for case in cases if counted(case, case["accum"]))
    device_name = describe_device(device, device_info)
    print(f"{device_name}, planned for {memory:.3g} GiB; shapes {shapes}; {len(cases)} cases, "
          f"estimated {_minutes(estimate)} on an H100")
    print(f"{'case':<52} {'status':<8} {'img/s':>8} {'peak GiB':>8} {'s':>6}  detail", flush=True)
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows.append(run_case(case, device, device_info, shapes))
        print(format_row(rows[-1]), flush=True)
        record = {"device": device_name, "device_info": dataclasses.asdict(device_info), "shapes": shapes,
                  "memory_gib": memory, "tolerances": TOLERANCES, "rows": rows, "cases_left": len(cases) - len(rows)}
        write_json(out / "gpu_check.json", record)  # whole: an interrupted check leaves the cases done
    bad = [row["case"] for row in rows if row["status"] not in ("ok", "no fit")]
    unfit = [row["case"] for row in rows if row["status"] == "no fit"]
    print(f"{len(rows) - len(bad) - len(unfit)} of {len(rows)} cases passed"
          + (f"; do not fit this card: {', '.join(unfit)}" if unfit else "")
          + (f"; not passed: {', '.join(bad)}" if bad else "")
          + f"; {_minutes(sum(row['seconds'] for row in rows))} (estimated {_minutes(estimate)})")
    return rows


def exit_code(rows: list[dict[str, Any]]) -> int:
    """0 when every case that fits passed, 1 otherwise."""
    return 0 if all(row["status"] in ("ok", "no fit") for row in rows) else 1


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise UserError(f"--capability must look like 8.0 (major.minor, as nvidia-smi's compute_cap); got '{text}'.")
    return int(major), int(minor)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(description="\n\n".join(doc[:4]), epilog=textwrap.dedent(doc[4]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print the cases, their batch split and estimated time, "
                        "and run nothing (no GPU needed)")
    parser.add_argument("--memory-gib", metavar="GIB[,GIB...]", help="the card's memory to plan for (default: this "
                        "GPU's; --plan without a GPU needs it; several, comma-separated, only with --plan)")
    parser.add_argument("--capability", metavar="X.Y", help="with --plan: the compute capability to plan for "
                        "(default: this GPU's, or 8.0 without one: bf16)")
    parser.add_argument("--full", action="store_true", help="every combination instead of the default set")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="folder of gpu_check.json "
                        "(default runs/gpu_check)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Check the arguments; print the plan, or run the check on GPU 0; the exit status."""
    memories = positive_numbers(args.memory_gib, "--memory-gib", "24 or 16,24,40,80") if args.memory_gib else None
    if args.capability and not args.plan:
        raise UserError("--capability plans for another GPU: give it with --plan (a check runs on this GPU's).")
    if memories and len(memories) > 1 and not args.plan:
        raise UserError("several --memory-gib values are for --plan; a check runs on one card.")
    device_info = with_nvidia_smi(read_device_info())  # the driver too, for the record and the messages
    usable = cuda_usable(device_info)
    if args.plan:
        if not memories and not usable:
            raise UserError("--plan without a usable GPU needs --memory-gib: the memory of the card to plan for, in "
                            "GiB (for example 24, or 16,24,40,80).")
        capability = _capability(args.capability) if args.capability else device_info.capability if usable else (8, 0)
        cases = check_cases(capability, args.full)
        print(f"plan: {'every combination' if args.full else 'the default set (--full: every combination)'}, "
              f"{len(cases)} cases, for compute capability {capability[0]}.{capability[1]} (precisions "
              f"{', '.join(precisions(capability))})")
        print(plan_table(cases, memories or [memory_gib(torch.device("cuda"))], RECIPE))
        return 0
    if not usable:
        instead = "This check has no CPU mode: run it on the machine with the GPU you will train on."
        raise UserError(cuda_unusable_message(device_info, "gpu_check.py checks a GPU", instead))
    make_writable_folder(args.out, "Give --out a folder you can write to; nothing was checked.")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # as train.py
    rows = run_checks(check_cases(device_info.capability, args.full), device, device_info, RECIPE,
                      memories[0] if memories else memory_gib(device), args.out)
    return exit_code(rows)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: the exit status as the module docstring says."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
