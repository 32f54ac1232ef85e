"""Command-line entry points that fail in one readable line.

- :func:`run_cli`: run a CLI's ``main``; an error prints as ``error: <Type>: <message>`` (its root
  cause, the exception that names the bad value), exit status 1. ``MONAI_CFT_DEBUG=1`` re-raises
  with the full traceback.
- :func:`install_error_hook`: the same for a process whose entry point is not ours
  (``python -m monai.bundle run ...``).
- :func:`count_arg` / :func:`number_arg`: ``argparse`` types that refuse text, fractions and
  non-finite values with the option's value in the message (``--angle nan``, ``--workers 1.5``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["DEBUG_ENV", "root_cause", "readable_error", "install_error_hook", "run_cli", "count_arg", "number_arg"]

#: environment variable that restores Python's full tracebacks for the CLIs' errors.
DEBUG_ENV = "MONAI_CFT_DEBUG"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (``__cause__``, else ``__context__`` unless suppressed): the one that
    names the problem.

    MONAI's config parser wraps an error raised inside a ``$`` expression or an instantiation in a
    ``RuntimeError`` ("Failed to evaluate ConfigExpression ..."), itself wrapped by the workflow.
    """
    seen = {id(exc)}
    while True:
        # ``raise ... from None`` hides the context on purpose (the new message already names the problem)
        nxt = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def readable_error(exc: BaseException) -> str:
    """One line for a person: the root cause's type and message (its first line)."""
    cause = root_cause(exc)
    text = str(cause).strip().splitlines()
    return f"error: {type(cause).__name__}: {text[0] if text else repr(cause)}"


def _report(exc: BaseException) -> None:
    print(readable_error(exc), file=sys.stderr)
    print(f"(the full traceback: run again with {DEBUG_ENV}=1)", file=sys.stderr)


def install_error_hook() -> None:
    """Make an uncaught error of this process print as one readable line (:func:`readable_error`).

    The full traceback is kept behind ``MONAI_CFT_DEBUG=1``; the exit status stays 1. Installed by
    :func:`monai_cft.utils.bundle.check_overrides` when the process is ``python -m monai.bundle``.
    """
    if _debug():
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if exc is None or isinstance(exc, KeyboardInterrupt):
            previous(exc_type, exc, tb)
            return
        _report(exc)

    sys.excepthook = hook


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` and return its exit status; an ``Exception`` becomes one line on stderr and status 1.

    ``SystemExit`` (argparse's usage errors, status 2) and ``KeyboardInterrupt`` pass through.
    With ``MONAI_CFT_DEBUG=1`` the exception is re-raised (full traceback).
    """
    try:
        return int(main(argv) or 0)
    except Exception as exc:  # noqa: BLE001 - the entry point: everything becomes one readable line
        if _debug():
            raise
        _report(exc)
        return 1


def count_arg(minimum: int = 1) -> Callable[[str], int]:
    """``argparse`` type: a whole number >= ``minimum`` (``"3"``; not ``"1.5"``, ``"abc"``, ``"0"`` for minimum 1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = "count"
    return parse


def number_arg(minimum: float | None = None, maximum: float | None = None) -> Callable[[str], float]:
    """``argparse`` type: a finite number in ``[minimum, maximum]`` (refuses ``"abc"``, ``"nan"``, ``"inf"``)."""
    bounds = "" if minimum is None and maximum is None else (
        f" in [{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number{bounds}, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or (
                maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected a finite number{bounds}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse
