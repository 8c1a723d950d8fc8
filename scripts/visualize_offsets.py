"""Draw where stacked deformable convolutions sample, as in Figs. 5 and 6 of the DCNv1 paper.

The command line around ``engine.offset_figure.offset_figure`` (tracing: ``engine/offsets.py``): for a
few output positions of one image it draws the 9^L sampling locations of the last L deformable layers,
coloured by the product of the v2 masks, beside per-layer maps of offset magnitude and mean mask.

Example:
    python scripts/visualize_offsets.py --checkpoint runs/def-conv-v2/last.pt \\
        --image ADE_val_00000001.jpg --points 300,200 500,380 --out runs/def-conv-v2/offsets.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from configs import UserError
from data.transforms import ValTransform
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from engine.console import command_line
from engine.offset_figure import offset_figure
from engine.offsets import DEFAULT_LAYERS, MAX_LAYERS, check_num_layers
from engine.workdir import make_writable_folder, write_whole
from models.segmentor import deformable_layers


def parse_points(texts: list[str]) -> list[tuple[int, int]]:
    """Parse ``x,y`` strings into integer pixel positions, or raise UserError naming the bad one."""
    points = []
    for text in texts:
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            x, y = (int(round(float(p))) for p in parts)
        except ValueError:
            raise UserError(
                f"--points value '{text}' is not a pixel position. Give each point as x,y in pixels of the original "
                f"image, for example --points 120,80 300,200."
            ) from None
        points.append((x, y))
    return points


def check_points(points: list[tuple[int, int]], width: int, height: int) -> None:
    """Raise UserError for the first point outside a ``width`` x ``height`` image."""
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise UserError(
                f"point {x},{y} lies outside the image, which is {width}x{height} pixels (x 0..{width - 1}, "
                f"y 0..{height - 1}). Give points as x,y pixel coordinates of the original image."
            )


def load_image(path: Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, or raise UserError saying what is wrong."""
    if not path.is_file():
        raise UserError(f"image {path} does not exist or is not a file. Give the path of a JPEG or PNG image.")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(
            f"could not read image {path} ({type(err).__name__}: {err}). Give a JPEG or PNG image that opens in "
            f"an image viewer."
        ) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Draw the sampling locations of a checkpoint's stacked deformable convolutions for a few output\n"
            "positions of one image, as in Figs. 5-6 of the DCNv1 paper: 9 points per layer, 9^L through L\n"
            "layers, coloured by the product of the modulation masks for DCNv2. Beside them: per-layer maps\n"
            "of the mean offset magnitude and, for DCNv2, of the mean mask. The image is resized as in\n"
            "evaluation (data.scale of the checkpoint's config)."
        ),
        epilog=(
            "example:\n"
            "  python scripts/visualize_offsets.py --checkpoint runs/def-conv-v2/last.pt \\\n"
            "      --image ADE_val_00000001.jpg --points 300,200 500,380 --out runs/def-conv-v2/offsets.png"
        ),
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by train.py (last.pt, best.pt)")
    parser.add_argument("--image", required=True, type=Path, help="image to draw on (any size; resized as in evaluation)")
    parser.add_argument("--points", nargs="+", default=None, metavar="X,Y",
                        help="output positions in pixels of the original image (default: a few on different classes)")
    parser.add_argument("--out", required=True, type=Path, help="file to write the figure to, as a PNG")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help=f"trace the last N deformable layers (default: up to {DEFAULT_LAYERS}, at most {MAX_LAYERS})")
    return parser.parse_args(argv)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Run the script; return the exit status (2 for a usage or input error)."""
    args = parse_args(argv)
    points = parse_points(args.points) if args.points else None
    rgb = load_image(args.image)
    if points is not None:
        check_points(points, rgb.shape[1], rgb.shape[0])
    make_writable_folder(args.out.parent, "Give --out a path in a folder you can write to; nothing was drawn.")
    checkpoint = load_checkpoint(args.checkpoint)
    model, config = build_model_from_checkpoint(checkpoint, args.checkpoint)
    if not deformable_layers(model):
        raise UserError(
            f"this checkpoint has no deformable layers: {args.checkpoint} holds a plain model "
            f"(model.deform.version is 0), so there are no offsets to draw. Give a checkpoint of a "
            f"def-conv-v1 or def-conv-v2 run."
        )
    check_num_layers(args.layers, list(deformable_layers(model)))
    image_tensor = ValTransform(config["data"])(Image.fromarray(rgb))
    figure = offset_figure(model, image_tensor, rgb, points, num_layers=args.layers,
                           iteration=checkpoint.get("iteration"), image_name=args.image.name)
    buffer = io.BytesIO()
    Image.fromarray(figure).save(buffer, format="PNG")
    write_whole(args.out, buffer.getvalue())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
