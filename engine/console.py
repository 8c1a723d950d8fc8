"""What every command line shares: output that any terminal can show, and a user error as one paragraph.

``@command_line`` wraps a script's ``main``. Its stdout and stderr write a character their encoding cannot show (a
Latin-1 or ASCII locale) as an escape (``\\xb1``) instead of ending the command in a ``UnicodeEncodeError``, and a
``UserError`` prints ``error: <paragraph>`` on stderr (``[rank N] error: ...`` under torchrun) and returns its
``exit_code`` (2; a non-finite training loss, 1). ``positive_numbers`` reads a flag's comma-separated positive numbers.
"""

from __future__ import annotations

import functools
import io
import math
import sys
from collections.abc import Callable

from configs import UserError, error_message
from engine.distributed import env_rank


def command_line(main: Callable[..., int]) -> Callable[..., int]:
    """``main`` with output safe in any locale and a ``UserError`` printed as ``error: <paragraph>``."""

    @functools.wraps(main)
    def run(*args: object, **kwargs: object) -> int:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):  # not an io.StringIO a caller redirected the output to
                stream.reconfigure(errors="backslashreplace")
        try:
            return main(*args, **kwargs)
        except UserError as err:
            prefix = f"[rank {env_rank()}] " if env_rank() else ""
            print(f"{prefix}error: {error_message(err)}", file=sys.stderr)
            return err.exit_code

    return run


def positive_numbers(text: str, flag: str, example: str) -> list[float]:
    """``0.5,1.0,1.5`` -> [0.5, 1.0, 1.5]; UserError naming ``flag`` (with ``example``) for anything but finite
    positive numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise UserError(f"{flag} must be positive numbers separated by commas, like {example}; got '{text}'.")
    return values
