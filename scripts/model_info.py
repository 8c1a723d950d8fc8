"""Print a config's model size and its deformable layers, without downloading any weights.

Example: ``python scripts/model_info.py --config def-conv-v2 --json runs/def-conv-v2-info.json``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs import load_config
from engine.console import command_line
from engine.workdir import write_json
from models.segmentor import build_model, count_parameters, deformable_layers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Build the model of a config (random weights: parameter counts do not depend on them) and print "
            "the parameters of the inference model (auxiliary head excluded), the parameters added by the "
            "deformable layers' offset/mask predictors, and each deformable layer with its version and dilation."
        ),
        epilog="Example: python scripts/model_info.py --config def-conv-v2 --json info.json model.deform.groups=4",
    )
    parser.add_argument(
        "--config", required=True, help="config name in configs/ (e.g. def-conv-v2) or a path to a YAML file"
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the numbers to this JSON file"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. model.deform.version=1"
    )
    return parser.parse_args(argv)


def model_info(config_name: str, overrides: list[str]) -> dict[str, object]:
    """Build the model of a config and return its name, parameter counts and deformable layer names."""
    config = load_config(config_name, overrides)
    model, names = build_model(config, load_pretrained=False)
    counts = count_parameters(model)
    layers = deformable_layers(model)
    return {
        "config": config["config_name"],
        "params": counts["params"],
        "deform_params": counts["deform_params"],
        "deform_layers": names,
        "details": [f"{name}: v{layers[name].version}, dilation {tuple(layers[name].dilation)}" for name in names],
    }


@command_line
def main(argv: list[str] | None = None) -> int:
    """Run the script; return the exit status (2 for a configuration error)."""
    args = parse_args(argv)
    info = model_info(args.config, args.overrides)
    print(f"config: {info['config']}")
    print(f"parameters (inference model, aux head excluded): {info['params']:,}")
    print(f"parameters added by deformable layers: {info['deform_params']:,}")
    print(f"deformable layers: {len(info['deform_layers'])}")
    for line in info["details"]:
        print(f"  {line}")
    if args.json is not None:
        record = {k: info[k] for k in ("config", "params", "deform_params", "deform_layers")}
        write_json(args.json, record)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
