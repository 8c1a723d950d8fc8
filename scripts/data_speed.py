"""Training data pipeline speed on one core: this repository's, and mmsegmentation 1.2.2's when it is importable.

Example: ``python scripts/data_speed.py --root data/ADEChallengeData2016 --split validation --max-images 3``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from configs import load_config
from data.dataset import SegmentationFolder
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, normalize_batch
from engine.console import command_line

Sampler = Callable[[int, int], object]


def _positive(text: str) -> int:
    """An argparse type: a positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Time the ADE20K training data pipeline from the JPEG/PNG files to a normalised input and a label "
            "(decode, rescale, cat_max_ratio crop, flip, photometric distortion, normalisation) in one process on "
            "one thread, in samples per second of the process's CPU time (other work on the machine does not "
            "count). When mmsegmentation is importable, its ADE20K training pipeline (mmseg 1.2.2's "
            "configs/_base_/datasets/ade20k.py, plus the normalisation its data preprocessor does) runs on the same "
            "files in alternating rounds and the ratio is printed: the figure to read."
        ),
        epilog="Example: python scripts/data_speed.py --root data/ADEChallengeData2016 --split validation "
        "--max-images 3",
    )
    parser.add_argument("--root", type=Path, default=Path("data/ADEChallengeData2016"),
                        help="an ADEChallengeData2016-layout folder (default: %(default)s)")
    parser.add_argument("--split", default="training", choices=("training", "validation"),
                        help="which split's files to read (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=100,
                        help="use the first N files sorted by name (default: %(default)s; 0 = all)")
    parser.add_argument("--config", default="ade20k-base",
                        help="config whose data section is this repository's recipe (default: %(default)s)")
    parser.add_argument("--samples", type=_positive, default=60,
                        help="samples per round and side (default: %(default)s)")
    parser.add_argument("--rounds", type=_positive, default=5, help="alternating rounds (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. data.resize_filter=bilinear")
    return parser.parse_args(argv)


def project_sampler(dataset: SegmentationFolder) -> Sampler:
    """One training sample of this repository: the dataset's decode and ``TrainTransform``, then ``normalize_batch``
    (which runs on the training device in a run, counted here as mmseg's normalisation is)."""

    def sample(index: int, seed: int) -> torch.Tensor:
        image, _, valid = dataset[(index, seed)]
        return normalize_batch(image[None], valid[None])

    return sample


def mmseg_sampler(dataset: SegmentationFolder) -> Sampler | str:
    """One training sample of mmsegmentation's ADE20K pipeline on the dataset's files, or why mmseg cannot run."""
    try:
        import cv2
        import mmseg
        from mmengine.config import Config

        try:
            import mmcv.ops  # noqa: F401
        except ImportError:  # mmcv-lite has no compiled ops; mmseg's transforms only import the name point_sample
            sys.modules["mmcv.ops"] = types.SimpleNamespace(point_sample=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mmseg.datasets.transforms  # noqa: F401  (registers mmseg's transforms)
            from mmseg.registry import TRANSFORMS
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    recipe = Config.fromfile(Path(mmseg.__file__).parent / ".mim/configs/_base_/datasets/ade20k.py")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = [TRANSFORMS.build(step) for step in recipe.train_pipeline]
    cv2.setNumThreads(0)  # one core, as torch
    warnings.filterwarnings("ignore", message=".*reduce_zero_label")  # mmseg's notice on every sample
    mean = torch.tensor(IMAGENET_MEAN[::-1]).view(3, 1, 1)  # mmseg's images are BGR
    std = torch.tensor(IMAGENET_STD[::-1]).view(3, 1, 1)

    def sample(index: int, seed: int) -> torch.Tensor:
        np.random.seed(seed)
        results = {"img_path": str(dataset.images[index]), "seg_map_path": str(dataset.labels[index]),
                   "reduce_zero_label": True, "seg_fields": []}
        for step in pipeline:
            results = step(results)
        return (results["inputs"].float() - mean) / std

    return sample


def time_rounds(samplers: dict[str, Sampler], files: int, samples: int, rounds: int) -> dict[str, list[float]]:
    """Samples/s of every sampler in each round; the order alternates from round to round."""
    for sample in samplers.values():
        sample(0, 0)  # imports, file cache
    rates = {name: [] for name in samplers}
    for round_index in range(rounds):
        names = list(samplers)[:: 1 if round_index % 2 == 0 else -1]
        for name in names:
            start = time.process_time()
            for k in range(samples):
                samplers[name](k % files, round_index * samples + k)
            rates[name].append(samples / (time.process_time() - start))
    return rates


@command_line
def main(argv: list[str] | None = None) -> int:
    """Run the script; return the exit status (2 for a configuration or data error)."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # as a loader worker (data.dataset._worker_init)
    config = load_config(args.config, args.overrides)
    dataset = SegmentationFolder(args.root, args.split, TrainTransform(config["data"]), args.max_images)
    samplers = {"this repository": project_sampler(dataset)}
    peer = mmseg_sampler(dataset)
    if isinstance(peer, str):
        print(f"mmsegmentation is not importable ({peer}); timing this repository alone (how to install it: "
              "docs/gpu-and-clusters.md, Data pipeline)")
    else:
        samplers["mmsegmentation"] = peer
    recipe = ", ".join(f"{key}={config['data'][key]}" for key in ("scale", "ratio_range", "crop_size",
                                                                   "cat_max_ratio", "photometric", "resize_filter"))
    print(f"{len(dataset)} files of {args.root / 'images' / args.split}; {recipe}")
    print(f"{args.samples} samples per round and side, {args.rounds} rounds, one thread, CPU time of this process")
    rates = time_rounds(samplers, len(dataset), args.samples, args.rounds)
    for name, values in rates.items():
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:16s} samples per CPU second: {shown} (median {statistics.median(values):.1f})")
    if len(rates) == 2:
        ratios = [a / b for a, b in zip(rates["this repository"], rates["mmsegmentation"])]
        print(f"this repository / mmsegmentation: {statistics.median(ratios):.2f}x (median of the rounds' ratios, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
