"""What every command line shares (engine/console.py): output any locale can show, a user error as one paragraph."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import UserError
from engine.console import command_line, positive_numbers

REPO = Path(__file__).resolve().parents[1]
COMMAND_LINES = sorted((REPO / "scripts").glob("*.py")) + [REPO / "train.py", REPO / "evaluate.py"]


@pytest.mark.parametrize("path", COMMAND_LINES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_line_runs_its_main_through_command_line(path: Path) -> None:
    """Issue 29, item 4: the safe output and the `error: <paragraph>` exit 2 hold for every command line at once."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert [d.id for d in main.decorator_list if isinstance(d, ast.Name)] == ["command_line"]


def test_a_character_the_terminal_cannot_show_is_escaped_and_a_user_error_is_one_line(monkeypatch, capsys) -> None:
    """Issue 29, item 4: a Latin-1 terminal cannot show the Δ and † of compare.py's table (before: UnicodeEncodeError
    at the print); the character comes out escaped and the rest of the output as it is."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1", write_through=True))

    @command_line
    def main(fail: bool) -> int:
        print("Δ val ± 0.5 †")
        if fail:
            raise UserError("the file ü.yaml is missing")
        return 0

    assert main(False) == 0 and raw.getvalue() == "\\u0394 val ± 0.5 \\u2020\n".encode("latin-1")
    assert main(True) == 2 and capsys.readouterr().err == "error: the file ü.yaml is missing\n"


def test_help_and_cpu_timing_print_no_cuda_home_warning(tmp_path: Path) -> None:
    """Issue 29, item 13: benchmark.py, gpu_check.py and loss_precision.py printed torch's "No CUDA runtime is found,
    using CUDA_HOME=..." even for --help: importing torch.utils.benchmark loads torch's C++-extension builder, which
    warns wherever a CUDA toolkit is found without a usable GPU (CUDA_HOME set here makes every machine such a one)."""
    code = ("import scripts.benchmark, scripts.gpu_check, scripts.loss_precision\n"
            "from engine.benchmark import seconds_per_call\n"
            "seconds_per_call({'nothing': lambda: None}, 1, 0.0)\n")
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "CUDA_HOME" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("text", ["nan", "inf", "1.0,-inf", "0", "-1", "1,x", ""])
def test_positive_numbers_refuse_anything_but_finite_positive_numbers(text: str) -> None:
    """evaluate.py's --scales and gpu_check.py's --memory-gib: NaN and infinity were accepted by gpu_check.py's copy."""
    assert positive_numbers("0.5, 1,1.5", "--scales", "0.5,1.0") == [0.5, 1.0, 1.5]
    with pytest.raises(UserError, match=r"^--scales must be positive numbers separated by commas, like 0.5,1.0; got"):
        positive_numbers(text, "--scales", "0.5,1.0")
