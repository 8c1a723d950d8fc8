"""Benchmark norm-conv, def-conv-v1 and def-conv-v2: training and inference speed, memory, the op, the data.

The command line around ``engine.benchmark`` (what is timed and how: its docstring).

    python scripts/benchmark.py --config def-conv-v2.yaml --batch-size 16 --crop 512 --amp bf16 --ops --data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from configs import UserError
from engine.benchmark import AMP_DTYPES, BenchOptions, benchmark, report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark the norm-conv, def-conv-v1 and def-conv-v2 variants of a config on synthetic data: training "
            "images/s (forward, loss, backward, SGD step as train.py), inference images/s and peak GPU memory, each "
            "also relative to norm-conv. --ops times the deformable op against a plain conv at the model's layer "
            "shapes and checks its accuracy; --data times the ADE20K training data pipeline per loader worker."
        ),
        epilog=(
            "example: python scripts/benchmark.py --config def-conv-v2 --batch-size 16 --crop 512 --amp bf16 --ops "
            "--data --json results/benchmark_h100.json"
        ),
    )
    parser.add_argument("--config", required=True, help="config name in configs/ or a path; model.deform.version is varied")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16, the recipe's)")
    parser.add_argument("--crop", type=int, default=512, help="square input size (default 512)")
    parser.add_argument(
        "--amp", choices=list(AMP_DTYPES), help="autocast dtype on CUDA (default: train.amp of the config); CPU runs without"
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations; the median is reported (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations before timing (default 5)")
    parser.add_argument("--variants", default="norm,v1,v2", help="comma-separated subset of norm,v1,v2 (default all)")
    parser.add_argument(
        "--paths",
        help="comma-separated subset of reference,triton: reference = torchvision's deform op and the unfused loss "
        "(model.deform_op=reference, train.loss_op=reference), triton = the Triton kernels (model.deform_op=triton, "
        "train.loss_op=triton; CUDA only). Default: both on CUDA, reference elsewhere",
    )
    parser.add_argument("--ops", action="store_true", help="also time deform_conv2d vs conv2d at the model's layer shapes")
    parser.add_argument("--data", action="store_true", help="also time the ADE20K training data pipeline in one process")
    parser.add_argument("--data-samples", type=int, default=64, help="samples timed by --data (default 64)")
    parser.add_argument("--data-images", type=int, default=8, help="generated 683x512 image/label pairs for --data (default 8)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all results as JSON here")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. model.deform.stages=[layer3,layer4]"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for user errors)."""
    args = parse_args(argv)
    options = BenchOptions(**{k: v for k, v in vars(args).items() if k != "json"})
    try:
        result = benchmark(options)
        print(report(result), end="")
        if args.json is not None:
            try:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")
            except OSError as err:
                raise UserError(f"could not write {args.json}: {err}. Choose another --json path.") from None
            print(f"wrote {args.json}", file=sys.stderr)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
