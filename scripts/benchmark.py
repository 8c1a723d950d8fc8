"""Benchmark norm-conv, def-conv-v1 and def-conv-v2: training and inference speed, peak memory, the ops.

The command line around ``engine.benchmark`` (what is timed and how: its docstring). On the CPU, --amp bf16 or fp16
runs only with --memory (CPU autocast, the memory table's stand-in for a GPU's): torchvision's deformable op has no
bf16 or fp16 CPU kernel for the speed and --ops tables.

    python scripts/benchmark.py --config def-conv-v2.yaml --ops
    python scripts/benchmark.py --config def-conv-v2.yaml --memory --amp none,bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from configs import UserError, load_config
from engine.benchmark import PATHS, VARIANTS, memory_rows, model_rows, op_rows, run_amp
from engine.console import command_line
from engine.device import choose_device, describe_device
from engine.diagnosis import read_device_info
from engine.memory import CARD_SHARE, CARDS_GIB, is_out_of_memory
from engine.workdir import write_json
from models.triton_support import triton_available


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark the norm-conv, def-conv-v1 and def-conv-v2 variants of a config on synthetic data: training "
            "images/s (engine.optim.train_step: aux head, loss, backward, SGD step), inference images/s and the "
            "training step's peak GPU memory. --ops times the deformable op (v1, v2) and a plain conv at the model's "
            "layer shapes and the loss, with their errors against float64; --memory measures the peak memory of a "
            "training step per image, and how many train.accum_steps the recipe's batch of 16 needs on 16-80 GB."
        ),
        epilog="example: python scripts/benchmark.py --config def-conv-v2.yaml --ops --json runs/benchmark.json",
    )
    parser.add_argument("--config", required=True, help="config name in configs/ or a path (its model.deform.version "
                        "is varied)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda if usable")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16, the recipe's)")
    parser.add_argument("--crop", type=int, default=512, help="square input size (default 512, the recipe's)")
    parser.add_argument("--amp", help="comma-separated precisions among auto,bf16,fp16,none (default: the config's "
                        "train.amp); on the CPU bf16/fp16 only with --memory (CPU autocast: the memory table's "
                        "stand-in figures)")
    parser.add_argument("--variants", default="norm,v1,v2", help="comma-separated subset of norm,v1,v2 (default all)")
    parser.add_argument("--paths", help="comma-separated subset of reference,triton: the ops model.deform_op and "
                        "train.loss_op run (triton needs CUDA). Default: both where Triton runs, else reference")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default 3)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds timed per case and round (default 1)")
    parser.add_argument("--ops", action="store_true", help="also time and check the deformable op and the loss")
    parser.add_argument("--memory", action="store_true", help="measure the memory table instead of the speed")
    parser.add_argument("--memory-batches", default="1,4", help="the two batch sizes --memory fits a line through "
                        "(default 1,4)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all results as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. "
                        "train.compile=true")
    return parser.parse_args(argv)


def choices(text: str, allowed: tuple[str, ...] | list[str], flag: str) -> list[str]:
    """The comma-separated ``text`` as a list of distinct ``allowed`` names, or a UserError naming ``flag``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in allowed for name in names) or len(set(names)) != len(names):
        raise UserError(f"{flag} must list some of {', '.join(allowed)} once each, separated by commas; got '{text}'.")
    return names


def run(args: argparse.Namespace) -> dict:
    """Check the arguments, run what they ask for and return the results (``report`` formats them)."""
    for flag, value in (("--batch-size", args.batch_size), ("--crop", args.crop), ("--rounds", args.rounds)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}.")
    if args.crop % 8:
        raise UserError(f"--crop must be a multiple of 8 (the model's output stride), got {args.crop}.")
    config = load_config(args.config, args.overrides)
    device_info = read_device_info()
    device = torch.device(choose_device(args.device, None, device_info))
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train.py
    variants = choices(args.variants, list(VARIANTS), "--variants")
    amps = choices(args.amp or config["train"]["amp"], ("auto", "bf16", "fp16", "none"), "--amp")
    amps = list(dict.fromkeys(run_amp(amp, device, device_info) for amp in amps))
    autocast = [amp for amp in amps if amp != "none"]
    if device.type == "cpu" and autocast and not args.memory:
        raise UserError(f"--amp {','.join(autocast)} on the CPU is for --memory only: torchvision's deformable op has "
                        f"no bf16 or fp16 CPU kernel to time. Use --amp none on the CPU, add --memory, or run on a GPU.")
    fast = triton_available(device)
    paths = choices(args.paths or ("reference,triton" if fast else "reference"), PATHS, "--paths")
    if "triton" in paths and not fast:
        raise UserError(f"--paths triton needs the Triton kernels, which run on CUDA with Triton installed, not on "
                        f"{device.type} here. Use --paths reference, or run on a GPU.")
    settings = f"config {config['config_name']}, crop {args.crop}"
    result = {"device": describe_device(device, device_info), "models": [], "ops": [], "memory": []}
    if args.memory:
        batches = tuple(sorted({int(b) for b in args.memory_batches.split(",") if b.strip().isdigit()}))
        if len(batches) != 2 or batches[0] < 1 or len(args.memory_batches.split(",")) != 2:
            raise UserError(f"--memory-batches must name two different batch sizes, e.g. 1,2; got "
                            f"'{args.memory_batches}'.")
        result["memory"] = memory_rows(config, variants, amps, batches, device, device_info, args.crop)
        return result | {"settings": f"{settings}, batches {batches[0]} and {batches[1]}"}
    result["models"] = model_rows(config, variants, paths, amps, device, device_info, args.batch_size, args.crop, args.rounds,
                                  args.min_time)
    if args.ops:
        result["ops"] = op_rows(config, paths, args.batch_size, args.crop, device, amps[0], args.rounds, args.min_time)
    return result | {"settings": f"{settings}, batch {args.batch_size}, median of {args.rounds} alternating rounds "
                                 f"of >= {args.min_time:g} s per case, {torch.get_num_threads()} CPU threads"}


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(result: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    lines = [f"{result['device']}; {result['settings']}"]
    if result.get("models"):
        lines += ["", "| model | path | amp | train img/s | × norm-conv | × reference | infer img/s | × norm-conv | "
                  "peak GiB (train) |", "|---" * 9 + "|"]
        lines += [f"| {r['name']} | {r['path']} | {r['amp']} | {_num(r['train_images_per_s'])} | "
                  f"{_num(r['train_x_norm'])} | {_num(r['train_x_reference'])} | {_num(r['infer_images_per_s'])} | "
                  f"{_num(r['infer_x_norm'])} | {_num(r['peak_gib'])} |" for r in result["models"]]
    if result.get("ops"):
        lines += ["", "| op | impl | shape | fwd ms | fwd+bwd ms | max rel err vs float64 |", "|---" * 6 + "|"]
        lines += [f"| {r['op']} | {r['impl']} | {r['shape']} | {_num(r['fwd_ms'], 3)} | {_num(r['fwd_bwd_ms'], 3)} | "
                  f"{r['max_rel_err']:.1e} |" for r in result["ops"]]
    if result.get("memory"):
        kind = "CPU process peak" if result["device"].startswith("CPU") else "torch.cuda.max_memory_allocated"
        cards = " | ".join(f"{card} GB" for card in CARDS_GIB)
        lines += ["", f"| model | amp | per image GiB | fixed GiB | accum_steps at batch 16 on {cards} |",
                  "|---" * (4 + len(CARDS_GIB)) + "|"]
        for r in result["memory"]:
            steps = ["-" if "error" in r else str(r["accum_steps"][card] or "no") for card in CARDS_GIB]
            cells = (r["error"], "") if "error" in r else (_num(r["per_image_gib"]), _num(r["fixed_gib"]))
            lines.append(f"| {r['name']} | {r['amp']} | {' | '.join(cells)} | {' | '.join(steps)} |")
        lines.append(f"({kind} of one training step at {result['memory'][0]['crop']}x{result['memory'][0]['crop']}, "
                     f"aux head; fits: peak <= {CARD_SHARE:.0%} of the card)")
    return "\n".join(lines) + "\n"


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for user errors)."""
    args = parse_args(argv)
    try:
        result = run(args)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise UserError(f"out of memory at --batch-size {args.batch_size} with every case resident at once. Use a "
                        f"smaller --batch-size, or fewer --variants, --paths or --amp per run.") from None
    print(report(result), end="")
    if args.json is not None:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
