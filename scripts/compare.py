"""Compare training runs: the study's table of final mIoU, parameters and speed, with seeds grouped.

The command line around ``engine.comparison.compare`` (grouping, statistics, table and figures live
there). Example: ``python scripts/compare.py runs/norm-conv runs/def-conv-v1 runs/def-conv-v2 --out results/``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs import UserError
from data.perturb import HELP as PERTURB_HELP
from data.perturb import parse_perturbation
from engine.comparison import IGNORED_KEYS, CompareOptions, compare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Compare runs of train.py as a markdown table (val/train mIoU, difference to norm-conv, parameters, "
            "speed). Runs of the same config with different seeds are grouped into one row (mean ± std), and each "
            "difference to the norm-conv group is compared with the seed-to-seed spread. Missing evaluations "
            "(RUN/eval_validation.json, RUN/eval_training.json) are made on each run's final checkpoint (last.pt) and saved in the run dir."
        ),
        epilog=(
            "example: python scripts/compare.py runs/norm-conv runs/norm-conv-s1 runs/def-conv-v1 runs/def-conv-v2 "
            "--out results/"
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by train.py")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="also write comparison.md, comparison.json, curves.png, final_miou.png and per_class_<variant>.png here"
    )
    parser.add_argument(
        "--no-eval", action="store_true",
        help="evaluate nothing: use saved eval JSONs, else the val mIoU logged at the final iteration (marked *)",
    )
    parser.add_argument(
        "--train-images", type=int, default=None, metavar="N",
        help="training images for the train mIoU (default: data.train_eval_images of each run's config)",
    )
    parser.add_argument(
        "--val-images", type=int, default=0, metavar="N",
        help="validation images for the val mIoU (default 0: the whole split; fewer only for a quick look)",
    )
    parser.add_argument("--data-root", help="dataset folder for evaluation, instead of data.root of the runs' configs")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="device for evaluation (default: cuda if available)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000, seeded)")
    parser.add_argument(
        "--perturb", nargs="+", default=[], metavar="KIND=VALUE",
        help="also evaluate every run on warped validation images (e.g. rotate=15 scale=0.75 shear=0.2 elastic=8) "
        f"and report each variant's mIoU and drop side by side; each one of {PERTURB_HELP}",
    )
    parser.add_argument(
        "--ignore-key", action="append", default=[], metavar="KEY",
        help=f"another dotted config key to ignore when grouping (always ignored: {', '.join(IGNORED_KEYS)})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for user errors)."""
    args = parse_args(argv)
    options = CompareOptions(
        runs=[Path(p) for p in args.runs], out=args.out, no_eval=args.no_eval, train_images=args.train_images,
        val_images=args.val_images, data_root=args.data_root, device=args.device, ignore_key=args.ignore_key,
        resamples=args.resamples, perturb=args.perturb,
    )
    for text in args.perturb:  # refused now, not after the first runs' evaluations
        try:
            parse_perturbation(text)
        except ValueError as err:
            print(f"error: --perturb: {err}", file=sys.stderr)
            return 2
    try:
        table = compare(options)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out is not None:
        print(f"\nwrote {args.out}/comparison.md, comparison.json and figures (curves, final mIoU, per-class differences)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
