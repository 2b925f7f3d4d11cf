"""What every command-line tool of vpr-edge shares: one error channel and quiet logs.

* A ``UserError`` (a bad path, file or option; an incompatible bundle or map) is printed as one
  line ``error: ...`` and the tool exits with code 2. Argument errors go the same way
  (``ArgumentParser``). Anything else is a bug and keeps its traceback.
* Quiet by default: ONNX Runtime's warnings (graph-optimiser notes, printed per node) are hidden;
  ``-v`` shows them (the export hides the PyTorch tracer's and Polygraphy's the same way,
  ``export.onnx_export``). Progress bars stay.

Torch-free: ``export/`` and ``calibration/`` use it too.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn

from .errors import OptionError, UserError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on the common channel: one line, exit 2 (sub-commands inherit it)."""

    def error(self, message: str) -> NoReturn:
        raise OptionError(f"{message} (see {self.prog} --help)")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show third-party warnings (ONNX Runtime, PyTorch tracer, Polygraphy)")


def one_line(message: str) -> str:
    """A multi-line message (a list of problems) joined into one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def configure_logs(verbose: bool = False) -> None:
    """Third-party log levels for a command: warnings only with ``verbose`` (ONNX Runtime's C++
    logger, and Python's logging, where ONNX Runtime's quantizer warns)."""
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR, format="%(levelname)s: %(message)s")
    try:
        import onnxruntime as ort
        ort.set_default_logger_severity(2 if verbose else 3)  # 2 warning, 3 error
    except ImportError:  # pragma: no cover - onnxruntime is a runtime requirement
        pass


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's body: a UserError becomes one line on stderr and exit code 2."""
    try:
        return body()
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
