"""What a run's numbers depend on besides the code and the config: package versions, the machine and the training data.

Recorded in every checkpoint (``environment``), so compare.py can refuse to group runs made with different versions
or on different data; requirements-lock.txt pins the versions the figures of the README and docs/ were measured with.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from typing import Any

import torch

from data.dataset import SegmentationFolder

# The packages whose versions can change a number: the direct dependencies and torch's compiler.
PACKAGES = ("torch", "torchvision", "triton", "numpy", "scipy", "pillow", "pyyaml", "tensorboard", "tqdm", "matplotlib")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device | None = None) -> dict[str, Any]:
    """Package versions (None where not installed), Python, the CPU model and core count, and the GPU if any."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    return {"packages": versions, "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_count": torch.multiprocessing.cpu_count(), "gpu": gpu}


def training_data(dataset: SegmentationFolder) -> dict[str, Any]:
    """The training split a run reads (its loader's dataset): its folder, its number of images and the sha256 of its
    listing (each image's and annotation's file name and size, in the listing's order)."""
    digest = hashlib.sha256()
    for pair in zip(dataset.images, dataset.labels):
        for path in pair:
            digest.update(f"{path.name} {path.stat().st_size}\n".encode())
    return {"root": str(dataset.root), "images": len(dataset), "sha256": digest.hexdigest()}
