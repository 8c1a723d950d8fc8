"""Reproducible numbers: the demo data under the locked environment, and bitwise-deterministic training.

The demo figures of the README and docs/ hold for requirements-lock.txt's versions. A new numpy or pillow release can
change the generated demo data (drawing, JPEG encoding), and with it every demo figure: the checksum
below then fails, asking for a deliberate update of the lock, this checksum and those figures.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import train
from data.demo import generate_demo_dataset
from engine.checkpoint import load_checkpoint

# sha256 of the decoded pixels of the first 3 training and 2 validation pairs of generate_demo_dataset(seed=0),
# measured with numpy 2.4.6 and pillow 13.0.0 (requirements-lock.txt).
DEMO_SHA256 = "f075c9cd69204cf619b06e8c7aaf034e68232cc120d6c1575fd12d3df8468d40"


def demo_digest(root: Path) -> str:
    """sha256 over the decoded image and label arrays of every file under ``root``, in name order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".jpg", ".png"):
            with Image.open(path) as im:
                array = np.asarray(im)
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_demo_data_checksum_under_the_locked_versions(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "demo", num_train=3, num_val=2)
    assert demo_digest(tmp_path / "demo") == DEMO_SHA256, (
        "the generated demo data changed (new numpy/pillow, or an edit of data/demo.py): update requirements-lock.txt "
        "deliberately, then this checksum and the demo figures of the README and docs/"
    )


def test_two_demo_trainings_give_bitwise_equal_weights(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "demo", num_train=8, num_val=2)
    overrides = [f"data.root={tmp_path / 'demo'}", "data.num_workers=0", "train.iters=2", "train.batch_size=2",
                 "train.val_interval=2", "train.ckpt_interval=2", "train.log_interval=1", "train.tb_images=0",
                 "data.crop_size=32", "data.scale=[48,48]"]
    states = []
    for name in ("a", "b"):
        assert train.main(["--config", "demo.yaml", "--work-dir", str(tmp_path / name), *overrides]) == 0
        states.append(load_checkpoint(tmp_path / name / "last.pt")["model"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
