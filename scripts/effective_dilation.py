"""How far do the deformable layers look? DCNv1's effective dilation per layer, by object size and by class.

For every validation image the checkpoint's model runs once (as in evaluation); each deformable layer's effective
dilation (the mean distance between adjacent sampling locations of its 3x3 kernel, in its input pixels;
``engine.offsets.effective_dilation``) is resized to the image like the logits and summed over the ground-truth
regions (``engine.statistics.region_sums``). Printed: mean ± std over the validation pixels per layer for regions of
thing classes in thirds of their area, regions of stuff classes (both without fragments, regions under 0.1% of the
image) and all, beside the plain layer's fixed dilation; per class with --classes. The measure is Table 2's of Dai et
al. 2017; its categories are not: Table 2 buckets object instances by box area, and ADE20K's annotations have no
instances, so a region here is a 4-connected region of one class (touching objects merge, an occluded one splits).
Example:

    python scripts/effective_dilation.py --checkpoint runs/def-conv-v2/last.pt --out dilation.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from configs import UserError
from data.dataset import build_val_loader, load_class_info
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from engine.console import command_line
from engine.device import inference_device
from engine.diagnosis import read_device_info
from engine.inference import predictions
from engine.offsets import capture_offsets, effective_dilation
from engine.statistics import DILATION_BUCKETS, FRAGMENT, dilation_table, region_sums
from engine.workdir import make_writable_folder, write_json, write_whole
from models.segmentor import deformable_layers

# ADE20K's stuff classes (0-based), as in its panoptic version (Zhou et al. 2017; Mask2Former's ADE20K_150_CATEGORIES
# with isthing 0): wall, building, sky, floor, tree, ceiling, road, grass, sidewalk, earth, mountain, plant, water,
# house, sea, rug, field, rock, base, sand, skyscraper, grandstand, path, runway, stairway, river, bridge, blind, hill,
# bar, hovel, tower, dirt track, land, escalator, buffet, poster, stage, conveyer belt, canopy, pool, falls, tent,
# cradle, tank, lake, blanket, pier, crt screen, shower.
STUFF = (0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46, 48, 51, 52, 54, 59, 60, 61, 63, 68,
         77, 79, 84, 91, 94, 96, 99, 100, 101, 105, 106, 109, 113, 114, 117, 122, 128, 131, 140, 141, 145)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Effective dilation of a checkpoint's deformable layers over the validation set (DCNv1's measure, Table "
            "2): the mean distance between adjacent sampling locations of each 3x3 kernel, in the layer's input "
            "pixels, per validation pixel; mean ± std per layer for small / medium / large thing regions (4-connected "
            f"regions of one thing class in the ground truth, in thirds of their area; not instances), stuff regions "
            f"(both without regions under {FRAGMENT:.1%} of the image) and all pixels, beside the plain layer's fixed "
            f"dilation."
        ),
        epilog="example: python scripts/effective_dilation.py --checkpoint runs/def-conv-v2/last.pt --out dilation.png",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint of a def-conv-v1 or -v2 run")
    parser.add_argument("--data-root", help="dataset folder, instead of data.root of the checkpoint's config")
    parser.add_argument("--max-images", type=int, default=0, metavar="N", help="the first N validation images (0: all)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto (default): CUDA when usable, else the CPU with a note saying why")
    parser.add_argument("--classes", action="store_true", help="also print the mean per class")
    parser.add_argument("--out", type=Path, metavar="PNG", help="draw the table as a PNG figure here")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every number here")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the model over the validation images; return the layers, their plain dilations and the table."""
    checkpoint = load_checkpoint(args.checkpoint)
    model, config = build_model_from_checkpoint(checkpoint, args.checkpoint)
    layers = deformable_layers(model)
    if not layers:
        raise UserError(f"{args.checkpoint} holds a plain model (model.deform.version 0): it has no offsets, so every "
                        f"layer's effective dilation is its dilation. Give a def-conv-v1 or def-conv-v2 checkpoint.")
    if args.max_images < 0:
        raise UserError(f"--max-images must be 0 (all) or positive, got {args.max_images}.")
    if args.data_root:
        config["data"]["root"] = args.data_root
    device = torch.device(inference_device(args.device, read_device_info()))
    loader = build_val_loader(config, "validation", 0, 1, max_images=args.max_images)
    parts = []
    with capture_offsets(model) as captured:
        for _, _, label in predictions(model.to(device), loader, device, config):
            maps = []
            for layer_name, layer in layers.items():
                offsets = captured[layer_name].pop().offsets  # this image's: one forward pass per image
                dilation = effective_dilation(offsets, tuple(layer.weight.shape[-2:]), layer.dilation)
                maps.append(F.interpolate(dilation[None], tuple(label.shape), mode="bilinear", align_corners=False))
            parts.append(region_sums(torch.cat(maps, 1)[0].cpu().numpy(), label.cpu().numpy()))
    columns = [np.concatenate([p[i] for p in parts], -1) for i in range(5)]
    return {"checkpoint": str(args.checkpoint), "layers": list(layers), "images": len(parts),
            "plain": [list(layer.dilation) for layer in layers.values()], **dilation_table(*columns, stuff=STUFF)}


def markdown(result: dict[str, Any], per_class: bool) -> str:
    """The table: one row per layer, mean ± std per bucket; per class the means, on request."""
    small, large = (100 * c for c in result["thirds"])
    fragments = result["fragments"]
    lines = [f"Effective dilation of {result['checkpoint']} on {result['images']} validation images (mean ± std over "
             f"the pixels, in each layer's input pixels; plain: the layer's fixed dilation; regions: 4-connected "
             f"regions of one class in the ground truth, not instances; thing regions in thirds by area: small up to "
             f"{small:.2g}% of the image, medium up to {large:.2g}%, large above; fragments, the "
             f"{fragments['regions']:,} regions ({fragments['pixels']:,} px) under "
             f"{100 * result['fragment_share']:.2g}% of the image, are in no bucket but in all)", "",
             "| layer | plain | " + " | ".join(f"{b} ({result['buckets'][b]['pixels']:,} px)" for b in DILATION_BUCKETS)
             + " | all |", "|" + "---|" * (len(DILATION_BUCKETS) + 3)]
    for i, (layer, plain) in enumerate(zip(result["layers"], result["plain"])):
        cells = [result["buckets"][b] for b in DILATION_BUCKETS] + [result["all"]]
        lines.append(f"| {layer} | {plain[0]} | " + " | ".join(
            f"{c['mean'][i]:.2f} ± {c['std'][i]:.2f}" if c["pixels"] else "-" for c in cells) + " |")
    if per_class:
        names = load_class_info()[0]
        lines += ["", "| class | kind | pixels | " + " | ".join(result["layers"]) + " |",
                  "|" + "---|" * (len(result["layers"]) + 3)]
        for c, row in sorted(result["classes"].items(), key=lambda item: -item[1]["pixels"]):
            lines.append(f"| {names[c]} | {'stuff' if c in STUFF else 'thing'} | {row['pixels']:,} | "
                         + " | ".join(f"{m:.2f}" for m in row["mean"]) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars per bucket and layer (mean, whiskers ± std), the plain dilation of each layer as a dashed line, as a PNG
    in ``path``."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    count = len(result["layers"])
    width = 0.8 / count
    for i, layer in enumerate(result["layers"]):
        cells = [result["buckets"][b] for b in DILATION_BUCKETS] + [result["all"]]
        x = np.arange(len(cells)) + (i - (count - 1) / 2) * width
        bars = ax.bar(x, [c["mean"][i] for c in cells], width, yerr=[c["std"][i] for c in cells], capsize=2,
                      label=f"{layer} (plain {result['plain'][i][0]})")
        ax.axhline(result["plain"][i][0], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
    names = [f"{b}\nthing regions" for b in DILATION_BUCKETS[:3]] + ["stuff\nregions", "all"]
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="effective dilation (input pixels)", title=f"Effective dilation of {result['checkpoint']}: mean ± std "
           f"over the pixels of {result['images']} validation images, dashed: the plain layers' dilation")
    ax.title.set_fontsize(9)
    ax.set_ylim(0, 1.3 * ax.get_ylim()[1])
    ax.legend(fontsize=8, loc="upper center", ncol=count)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_whole(path, buffer.getvalue())


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for user errors)."""
    args = parse_args(argv)
    for flag, path in (("--out", args.out), ("--json", args.json)):  # fail now, not after the measurement
        if path is not None:
            make_writable_folder(path.parent, f"Give {flag} a path in a folder you can write to; nothing was measured.")
    result = measure(args)
    if args.out is not None:
        plot(result, args.out)
    if args.json is not None:
        write_json(args.json, result)
    print(markdown(result, args.classes), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
