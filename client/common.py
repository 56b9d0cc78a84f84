"""What the commands share: `--socket` and `-v`, given before the command or after it, sizes, the one-line
error, and the warning when the daemon made a change that its state file does not hold."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.vocabulary import DEFAULT_CONFIG, DEFAULT_SOCKET, SizeError, parse_size


class UsageError(Exception):
    """Raised by a command with one line for the user (the daemon's start-up problems among them)."""


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def common_options(p: argparse.ArgumentParser, top: bool = False, run: bool = False) -> None:
    """Adds --socket and -v to `p`: the top parser's default None and False, a command's SUPPRESS, so that a
    value given before the command is kept when the command does not repeat it."""
    unset: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--socket", metavar="PATH", **unset, help=(
        f"the control socket to serve (default: [daemon] socket of the configuration, else {DEFAULT_SOCKET})" if run
        else f"daemon control socket (default: $GPUWATCH_SOCKET, else [daemon] socket of {DEFAULT_CONFIG} where it "
             f"is readable, else {DEFAULT_SOCKET})"))
    p.add_argument("-v", "--verbose", action="store_true", **unset, help="log more")


def warn_unsaved(result: dict[str, Any]) -> None:
    """The change happened, but the daemon's state file does not hold it (a full or read-only disk)."""
    if result.get("saved") is False:
        print(f"gpuwatch: warning: the state file could not be written ({result.get('save_error', 'no reason')}): "
              "this will not survive a daemon crash", file=sys.stderr)
