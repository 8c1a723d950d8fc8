"""Evaluate segmentation checkpoints: mIoU, aAcc, mAcc and the ADE20K challenge score.

    python evaluate.py --checkpoint runs/norm-conv/last.pt runs/def-conv-v2/last.pt --json runs/results.json
    torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/def-conv-v2/last.pt --tta flip --scales 0.5,1.0,1.5

The command line around ``engine.evaluation.evaluate_checkpoint``: it parses arguments, evaluates each
checkpoint and prints a per-class table and a summary (the metric: ``engine/metric.py``; inference:
``engine/inference.py``). Evaluation runs in fp32 unless ``--amp`` asks for autocast (auto, bf16, fp16: the fast
option), resolved for the GPU by the rule train.amp follows.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from configs import UserError, load_config
from data.perturb import HELP as PERTURB_HELP
from engine.checkpoint import load_checkpoint
from engine.console import command_line, positive_numbers
from engine.device import AMP_DTYPES, inference_device, resolve_amp
from engine.diagnosis import read_device_info
from engine.distributed import env_rank, init_distributed, shutdown
from engine.evaluation import evaluate_checkpoint
from engine.lock import output_lock
from engine.workdir import make_writable_folder, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Evaluate one or more checkpoints on ADE20K (or the demo set): mIoU, aAcc, mAcc and the "
            "challenge score (aAcc + mIoU) / 2, with a per-class IoU table. The model and data settings "
            "come from the config stored in each checkpoint. Runs under torchrun for several GPUs."
        ),
        epilog=(
            "example: python evaluate.py --checkpoint runs/norm-conv/last.pt runs/def-conv-v2/last.pt "
            "--json runs/results.json\n"
            "         torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/def-conv-v2/last.pt "
            "--tta flip --scales 0.5,0.75,1.0,1.25,1.5,1.75"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint file(s) written by train.py")
    parser.add_argument("--config", help="check the checkpoint against this config and use its data/eval settings")
    parser.add_argument("--data-root", help="dataset folder, instead of data.root of the checkpoint's config")
    parser.add_argument("--split", choices=["validation", "training"], default="validation")
    parser.add_argument(
        "--max-images", type=int, default=None,
        help="evaluate only the first N images (sorted by name); default: all of validation, "
        "data.train_eval_images of training",
    )
    parser.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: also the mirrored image")
    parser.add_argument("--scales", default="1.0", help="comma-separated test scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    parser.add_argument("--mode", choices=["whole", "slide"], help="inference mode (default: eval.mode of the config)")
    parser.add_argument("--save-predictions", metavar="DIR", help="write ADE20K submission PNGs (class + 1) here")
    parser.add_argument("--json", metavar="PATH", help="write the metrics as JSON here")
    parser.add_argument(
        "--perturb", metavar="KIND=VALUE",
        help=f"evaluate on warped images and labels: {PERTURB_HELP} (deterministic per image; pixels from outside the "
        "image are ignored)",
    )
    parser.add_argument(
        "--per-image", metavar="PATH",
        help="also save every image's per-class and object-size counts (.npz) for compare.py's intervals; "
        "with several checkpoints, NAME is inserted before the suffix",
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto (default): CUDA when usable, else the CPU with a note saying why")
    parser.add_argument(
        "--amp", choices=["auto", *AMP_DTYPES], default="none",
        help="autocast on CUDA, resolved as train.amp is (auto: bf16 on GPUs of capability 8.0 or newer, fp16 below; "
        "default none: fp32, as mmsegmentation)",
    )
    return parser.parse_args(argv)


def checkpoint_names(paths: list[Path]) -> list[str]:
    """Short unique names: the file stem, or parent_stem where stems repeat (runs/a/best.pt -> a_best)."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def per_image_path(template: str | None, name: str, several: bool) -> Path | None:
    """Where --per-image saves the counts of checkpoint ``name``: NAME inserted before the suffix for several."""
    if template is None:
        return None
    path = Path(template)
    return path.with_name(f"{path.stem}_{name}{path.suffix}") if several else path


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def class_table(title: str, record: dict[str, Any]) -> str:
    """Per-class rows for the classes present in ground truth or prediction (the others are counted)."""
    rows = record["per_class"]
    width = max(len(r["name"]) for r in rows)
    lines = [title, f"{'id':>4}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    lines += [f"{i:>4}  {r['name']:<{width}}  {_fmt(r['iou']):>6}  {_fmt(r['acc']):>6}"
              for i, r in enumerate(rows) if r["iou"] is not None]
    absent = sum(r["iou"] is None for r in rows)
    if absent:
        lines.append(f"({absent} classes appear in neither ground truth nor prediction: not shown, not in mIoU)")
    return "\n".join(lines)


def summary_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per checkpoint: mIoU, aAcc, mAcc, score, images, images/s."""
    width = max([len("checkpoint")] + [len(name) for name, _ in rows])
    lines = [f"{'checkpoint':<{width}}  {'mIoU':>6}  {'aAcc':>6}  {'mAcc':>6}  {'score':>6}  {'images':>6}  {'img/s':>6}"]
    for name, r in rows:
        lines.append(
            f"{name:<{width}}  {_fmt(r['mIoU']):>6}  {_fmt(r['aAcc']):>6}  {_fmt(r['mAcc']):>6}  "
            f"{_fmt(r['score']):>6}  {r['num_images']:>6}  {r['images_per_s']:>6.2f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, evaluate every checkpoint, print and write the results."""
    device_info = read_device_info()
    device_name = inference_device(args.device, device_info)
    amp = resolve_amp(args.amp, device_name, device_info.capability, "--amp")
    if args.max_images is not None and args.max_images < 0:
        raise UserError(f"--max-images must be 0 (all) or a positive number, got {args.max_images}.")
    scales = positive_numbers(args.scales, "--scales", "0.5,1.0,1.5")  # checked before any work
    changes = {"eval.scales": scales, "eval.flip": args.tta == "flip"}
    changes.update({"eval.mode": args.mode} if args.mode else {})
    changes.update({"data.root": args.data_root} if args.data_root else {})
    config_override = load_config(args.config) if args.config else None
    paths = [Path(p) for p in args.checkpoint]
    for path in paths:  # a typo in the last of several checkpoints should not wait for the others
        if not path.is_file():
            load_checkpoint(path)
    for target in (args.json, args.save_predictions, args.per_image):  # fail now, not after the evaluation
        if target:
            folder = Path(target) if target == args.save_predictions else Path(target).parent
            make_writable_folder(folder, f"{target} should go there: choose a folder you can write to; nothing was evaluated.")
    names = checkpoint_names(paths)
    per_images = [per_image_path(args.per_image, name, len(paths) > 1) for name in names]
    outputs = ([Path(args.json)] if args.json else []) + [p for p in per_images if p is not None]
    locks = ExitStack()
    try:
        if env_rank() == 0:  # one writer per output file: a second evaluation writing the same file is refused now
            for target in outputs:
                locks.enter_context(output_lock(target))
        rank, world_size, device = init_distributed(device_name)
        results = []
        for path, name, per_image in zip(paths, names, per_images):
            save_dir = Path(args.save_predictions) / (name if len(paths) > 1 else "") if args.save_predictions else None
            record = evaluate_checkpoint(
                path, device, args.split, args.max_images, amp, changes, config_override, args.perturb, save_dir,
                per_image,
            )
            if rank == 0:
                print(class_table(f"\n{name} ({path}): per-class IoU and accuracy (%)", record))
            results.append((name, record))
        if rank == 0:
            first = results[0][1]
            print(f"\nsplit {args.split}, mode {first['mode']}, scales {first['scales']}, flip {first['flip']}, "
                  f"amp {first['amp']}, perturb {first['perturb'] or 'none'}, {world_size} process(es)")
            print(summary_table(results))
            if args.json:
                records = [r for _, r in results]
                write_json(Path(args.json), records[0] if len(records) == 1 else records)
                print(f"wrote {args.json}")
    finally:
        shutdown()
        locks.close()
    return 0


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 with a one-paragraph message for user errors)."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
