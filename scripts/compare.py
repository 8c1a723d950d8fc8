"""Compare runs of train.py: the study's table, and whether each difference is real.

The command line around ``engine.comparison.compare`` (checks, grouping, tables and figures live there; the
statistics in ``engine.statistics``). Example: ``python scripts/compare.py runs/norm-conv runs/def-conv-v1
runs/def-conv-v2 --out results/``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs import UserError
from data.perturb import HELP as PERTURB_HELP
from data.perturb import parse_perturbation
from engine.comparison import compare
from engine.console import command_line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Compare finished runs of train.py that share one recipe (every setting outside the model, also after a "
            "resume, the training data and the package versions; runs that differ elsewhere are refused, naming the "
            "settings). Runs of one model with different seeds are one group (n seeds, mean ± std). Each group is "
            "compared with the reference (norm-conv) and with --pair groups: the difference of the final checkpoints "
            "on other images (paired jackknife over the validation images) and, with 3 or more seeds a side, of the "
            "recipes for other seeds on these images (Welch t) and on other images (seeds x images). "
            "Evaluations are made on each run's last.pt where the saved ones (RUN/eval_*.json, RUN/per_image_*.npz) "
            "are missing or belong to another checkpoint."
        ),
        epilog="example: python scripts/compare.py runs/norm-conv runs/norm-conv-s1 runs/def-conv-v2 "
               "runs/def-conv-v2-s1 runs/norm-conv-dilated --pair def-conv-v2 norm-conv-dilated --out results/",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by train.py")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="also write comparison.md, comparison.json, curves.png and, where classes have intervals, "
                             "per_class_<b>_vs_<a>.png here")
    parser.add_argument("--reference", metavar="GROUP",
                        help="the group every other is compared with (default: the norm-conv group)")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("B", "A"),
                        help="also compare group B with group A (repeatable): --pair def-conv-v2 norm-conv-dilated")
    parser.add_argument("--allow-differences", action="store_true",
                        help="compare runs of different recipes anyway (the output's first line names the differences)")
    parser.add_argument("--no-eval", action="store_true",
                        help="evaluate nothing: use the saved evaluations of each last.pt only")
    parser.add_argument("--train-images", type=int, default=None, metavar="N",
                        help="training images for the train mIoU (default: data.train_eval_images of each run)")
    parser.add_argument("--val-images", type=int, default=0, metavar="N",
                        help="validation images (default 0: the whole split; fewer only for a quick look)")
    parser.add_argument("--data-root", help="dataset folder for evaluation, instead of data.root of the runs' configs")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="device for evaluation: auto (default) is CUDA when usable, else the CPU with a note")
    parser.add_argument(
        "--perturb", nargs="+", default=[], metavar="KIND=VALUE",
        help="also evaluate every run on warped validation images (e.g. rotate=15 scale=0.75 shear=0.2 elastic=8): "
        f"each group's mIoU under each, and each pair's difference of the changes with its intervals; each one of "
        f"{PERTURB_HELP}",
    )
    return parser.parse_args(argv)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for user errors)."""
    args = parse_args(argv)
    for text in args.perturb:  # refused now, not after the first runs' evaluations
        try:
            parse_perturbation(text)
        except ValueError as err:
            raise UserError(f"--perturb: {err}") from None
    for name in ("train_images", "val_images"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 (all images of the split) or positive, got "
                            f"{value}.")
    markdown, written = compare(args)
    print(markdown, end="")
    if written:
        print(f"\nwrote {', '.join(str(args.out / name) for name in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
