"""The Triton modules (models/triton_*.py, engine/triton_loss.py) are off the default path: a run with the reference ops never imports them,
the triton ops import them when first called. Each check runs in a fresh process: this one has imported everything.

(The ``triton`` package itself is loaded by torchvision: torchvision.ops imports torch._dynamo, which imports
triton when it is installed. So the check is on this repository's modules.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import write_ade_tree

REPO = Path(__file__).resolve().parents[1]
# Prints the repository's Triton modules loaded so far, as one line.
LOADED = "print('loaded:', *sorted(m for m in sys.modules if m.startswith(('models.triton', 'engine.triton'))))"


def loaded_modules(program: str, *args: str) -> list[list[str]]:
    """Run ``program`` (which prints LOADED lines) in a fresh Python; each LOADED line's modules, in order.

    Triton's CPU interpreter is on, so the Triton paths could run here; one thread, as the machine runs other tests.
    """
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", program, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("loaded:")]


def test_a_run_with_the_reference_ops_imports_no_triton_module(tmp_path: Path) -> None:
    """train.py with the demo config on the CPU: two iterations, a validation and a checkpoint, none of
    this repository's Triton modules."""
    tree = write_ade_tree(tmp_path / "ADEChallengeData2016", num_train=2, num_val=1, size=(40, 40))
    args = ["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), "--device", "cpu", f"data.root={tree}",
            "data.dataset=ade20k", "data.num_workers=0", "data.scale=[40,40]", "data.crop_size=32",
            "train.batch_size=2", "train.iters=2", "train.val_interval=2", "train.ckpt_interval=2",
            "train.tb_images=0", "model.deform_op=reference", "train.loss_op=reference"]
    program = f"import sys, train\ncode = train.main(sys.argv[1:])\n{LOADED}\nsys.exit(code)"
    assert loaded_modules(program, *args) == [[]]


def test_the_triton_ops_import_their_modules_when_called() -> None:
    """The loss and deformable op entries that train.loss_op=triton and model.deform_op=triton pick load the kernels
    at their first call, not before (run here in Triton's CPU interpreter, on a few pixels)."""
    program = f"""import sys, torch
from engine.loss import upsample_cross_entropy
from models.deform_conv import DEFORM_OPS
{LOADED}
upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.randint(0, 3, (1, 4, 4)), "triton")
DEFORM_OPS["triton"](torch.randn(1, 2, 3, 3), torch.zeros(1, 18, 3, 3), torch.randn(2, 2, 3, 3), padding=(1, 1))
{LOADED}"""
    before, after = loaded_modules(program)
    assert before == []
    assert {"models.triton_deform", "engine.triton_loss"} <= set(after)
