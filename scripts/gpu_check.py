"""First run on a new machine: does every training, evaluation and fast path work on this GPU, and how fast?

At the recipe's shapes (batch 16, 512x512 crops, aux head) it runs one training step (``engine.trainer.train_step``
after a warm-up step, then timed) of norm-conv, def-conv-v1 and def-conv-v2 in each precision the GPU supports
(bf16 from compute capability 8.0, fp16, none) with and without channels_last; the Triton ops against the
reference (values and gradients against float64, within TOLERANCES, printed in each row); a whole-image and a slide
evaluation of a 512x2048 image; the Triton paths and torch.compile in the precision train.amp=auto picks. Each case
runs on its own (a failure is a row of the table, not the end of the check); the table grows line by line and
is rewritten to ``--out``/gpu_check.json after every case. Exit status: 0 all passed, 1 a failure or a mismatch,
2 no usable CUDA here.

    python scripts/gpu_check.py                      # writes runs/gpu_check/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

from configs import load_config
from data import IGNORE_INDEX
from engine.benchmark import (GIB, PATHS, VARIANTS, TrainingCase, case_config, conv_op, deform_inputs, loss_inputs,
                              op_errors, seconds_per_call)
from engine.console import command_line
from engine.device import (DeviceFacts, autocast, cuda_unusable_message, cuda_usable, describe_device, device_facts,
                           memory_format, resolve_amp, with_nvidia_smi)
from engine.inference import predict_logits
from engine.loss import LOSS_OPS
from engine.workdir import write_json
from models.deform_conv import DEFORM_OPS
from models.segmentor import build_model
from models.triton_loss import reference_upsample_cross_entropy
from models.triton_support import triton_available

CONFIG = "def-conv-v2.yaml"  # the recipe; the variants change model.deform.version
# batch, crop, evaluated image (height, width), channels of the deformable op (layer4's conv2), timing per case.
RECIPE = {"batch": 16, "crop": 512, "eval_size": (512, 2048), "width": 512, "min_run_time": 0.5}
# The largest max relative error (max|a - b| / max|b|, over the output and every gradient) of an op against float64
# on the same inputs: the CPU tests' (tests/test_triton_*.py), but 1e-4 for the fp32 loss (1e-5 there, on sums over
# far fewer pixels). bf16/fp16 keep 8/11 significant bits: the deformable op rounds its operands, the loss its
# gradient, once.
TOLERANCES = {"deform": {"none": 1e-4, "bf16": 3e-2, "fp16": 5e-3}, "loss": {"none": 1e-4, "bf16": 1e-2, "fp16": 1e-2}}


def precisions(facts: DeviceFacts) -> list[str]:
    """The precisions this GPU runs, train.amp=auto's first: bf16 where ``resolve_amp`` allows it, fp16, none."""
    return (["bf16"] if resolve_amp("auto", "cuda", facts.capability) == "bf16" else []) + ["fp16", "none"]


def check_cases(facts: DeviceFacts) -> list[dict[str, Any]]:
    """Every case for a GPU with these facts, the quick ones first (torch.compile's last)."""
    amps = precisions(facts)

    def train(variant: str, amp: str, channels_last: bool, path: str = "reference", compile: bool = False) -> dict:
        layout = "channels_last" if channels_last else "contiguous"
        name = f"train {VARIANTS[variant][0]} {amp} {layout}{' ' + path if path != 'reference' else ''}"
        return {"kind": "train", "name": name + (" compile" if compile else ""), "variant": variant, "amp": amp,
                "channels_last": channels_last, "path": path, "compile": compile}

    cases = [train(v, amp, cl) for v in VARIANTS for amp in amps for cl in (True, False)]
    cases += [{"kind": "op", "name": f"{op} {impl} {amp}", "op": op, "impl": impl, "amp": amp}
              for op in ("deform v1", "deform v2", "loss") for amp in amps for impl in PATHS]
    cases += [{"kind": "eval", "name": f"eval {VARIANTS[v][0]} {mode} {amps[0]}", "variant": v, "mode": mode,
               "amp": amps[0]} for v in VARIANTS for mode in ("whole", "slide")]
    cases += [train(v, amps[0], True, "triton") for v in VARIANTS]
    cases += [train(v, amps[0], True, compile=True) for v in VARIANTS]
    return cases + [train("v2", amps[0], True, "triton", compile=True)]


def _config(case: dict[str, Any], device: torch.device, facts: DeviceFacts) -> dict[str, Any]:
    """The recipe's config for ``case``, resolved for ``device``; an error where the Triton path cannot run."""
    if case.get("path") == "triton" and not triton_available(device):
        raise RuntimeError("the Triton kernels cannot run here (Triton 3.2 or newer on CUDA): the path would fall back")
    config = load_config(CONFIG)
    config["train"]["channels_last"] = case.get("channels_last", True)
    config["train"]["compile"] = case.get("compile", False)
    return case_config(config, VARIANTS[case["variant"]][1], case.get("path", "reference"), case["amp"], device, facts)


def train_case(case: dict[str, Any], device: torch.device, facts: DeviceFacts, shapes: dict[str, Any]) -> dict:
    """A warm-up step and a measured one (finite losses, the peak), then the time per step."""
    if case["compile"]:
        torch.compiler.reset()
    step = TrainingCase(_config(case, device, facts), device, shapes["batch"], shapes["crop"])
    peak = step.peak_bytes()
    losses = step.train()
    if not all(torch.isfinite(value) for value in losses.values()):
        return {"status": "mismatch", "detail": f"non-finite loss {({k: float(v) for k, v in losses.items()})}"}
    seconds = seconds_per_call({"train": step.train}, 1, shapes["min_run_time"])["train"]
    return {"status": "ok", "images_per_s": shapes["batch"] / seconds, "peak_gib": None if peak is None else peak / GIB,
            "detail": f"loss {float(losses['total']):.3f}"}


def op_case(case: dict[str, Any], device: torch.device, facts: DeviceFacts, shapes: dict[str, Any]) -> dict:
    """The op's output and gradients against float64 on the same inputs, at layer4's conv2 / the heads' logits."""
    impl, amp, batch, crop = case["impl"], case["amp"], shapes["batch"], shapes["crop"]
    if impl == "triton" and not triton_available(device):
        raise RuntimeError("the Triton kernels cannot run here (Triton 3.2 or newer on CUDA)")
    if case["op"] == "loss":  # as in train_step: the loss runs outside autocast, on the heads' logits
        inputs = loss_inputs(batch, crop, 150, device, amp)
        call = functools.partial(LOSS_OPS[impl], ignore_index=IGNORE_INDEX)
        errors = op_errors(call, functools.partial(reference_upsample_cross_entropy, ignore_index=IGNORE_INDEX),
                           inputs, device, "none")
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


def eval_case(case: dict[str, Any], device: torch.device, facts: DeviceFacts, shapes: dict[str, Any]) -> dict:
    """``predict_logits`` of one image (whole or slide windows of the crop), as evaluation runs it."""
    config, size = _config(case, device, facts), shapes["eval_size"]
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    layout = memory_format(config["train"]["channels_last"])
    model = build_model(config, load_pretrained=False)[0].to(device, memory_format=layout).eval()
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    image = image.contiguous(memory_format=layout)

    def predict() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, config["train"]["amp"]):
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


def run_case(case: dict[str, Any], device: torch.device, facts: DeviceFacts, shapes: dict[str, Any]) -> dict:
    """One case's row of the table; a failure becomes the row (FAIL and the error), never an exception."""
    start = time.perf_counter()
    try:
        row = RUNNERS[case["kind"]](case, device, facts, shapes)
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


def run_checks(cases: list[dict[str, Any]], device: torch.device, facts: DeviceFacts, shapes: dict[str, Any],
               out: Path) -> list[dict[str, Any]]:
    """Run every case, print the table line by line and rewrite ``out``/gpu_check.json after each case."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"{describe_device(device, facts)}; shapes {shapes}")
    print(f"{'case':<52} {'status':<8} {'img/s':>8} {'peak GiB':>8} {'s':>6}  detail", flush=True)
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows.append(run_case(case, device, facts, shapes))
        print(format_row(rows[-1]), flush=True)
        record = {"device": describe_device(device, facts), "facts": dataclasses.asdict(facts), "shapes": shapes,
                  "tolerances": TOLERANCES, "rows": rows, "cases_left": len(cases) - len(rows)}
        write_json(out / "gpu_check.json", record)  # whole: an interrupted check leaves the cases done
    bad = [row["case"] for row in rows if row["status"] != "ok"]
    print(f"{len(rows) - len(bad)} of {len(rows)} cases passed" + (f"; not passed: {', '.join(bad)}" if bad else ""))
    return rows


def exit_code(rows: list[dict[str, Any]]) -> int:
    """0 when every case passed, 1 otherwise."""
    return 0 if all(row["status"] == "ok" for row in rows) else 1


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: run the check on GPU 0; the exit status as the module docstring says."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="folder of gpu_check.json "
                        "(default runs/gpu_check)")
    args = parser.parse_args(argv)
    facts = with_nvidia_smi(device_facts())  # the driver too, for the record
    if not cuda_usable(facts):
        instead = "This check has no CPU mode: run it on the machine with the GPU you will train on."
        print(f"error: {cuda_unusable_message(facts, 'gpu_check.py checks a GPU', instead)}", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # as train.py
    return exit_code(run_checks(check_cases(facts), torch.device("cuda"), facts, RECIPE, args.out))


if __name__ == "__main__":
    sys.exit(main())
