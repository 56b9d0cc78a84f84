"""`gpuwatch move PID --to GPU`: a process not under the interposer onto another GPU of the host (root)."""
from __future__ import annotations

import argparse

from ..core.protocol import Client
from ..core.vocabulary import human_bytes, socket_path
from .common import warn_unsaved
from .control import PAUSE_TIMEOUT


def gpu_argument(text: str) -> int | str:
    """A host GPU index (0, 1, ...) or a UUID as NVML writes it (GPU-...)."""
    if text.isdigit():
        return int(text)
    if not text.startswith("GPU-"):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a GPU index nor a GPU UUID (GPU-...)")
    return text


def cmd_move(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path(), timeout=PAUSE_TIMEOUT) as client:
        result = client.call("move", pid=args.pid, to=args.to)
    print(f"gpuwatch: pid {args.pid} moved from GPU {result['from']} to GPU {result['to']} ({result['uuid']}): "
          f"{human_bytes(result['bytes'])} in {result['seconds']:.2f} s")
    warn_unsaved(result)
    return 0


def add_move_parser(sub: argparse._SubParsersAction) -> None:
    move = sub.add_parser("move", help="move a process to another GPU (as root)",
                          description="A process not under `gpuwatch exec` is locked, checkpointed, restored onto "
                                      "GPU (the driver's checkpoint API, r580 and later) and unlocked; its device "
                                      "ordinal stays. Only where GPU has room for all it holds and host memory can "
                                      "take the checkpoint; otherwise it runs on untouched.")
    move.add_argument("pid", type=_pid, metavar="PID")
    move.add_argument("--to", type=gpu_argument, required=True, metavar="GPU", help="the host's GPU index or UUID")
    move.set_defaults(func=cmd_move)


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)
