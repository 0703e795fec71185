"""Command line: ``contrastive-lw <command> ...``. Each command lives in ``commands/<name>.py``
with ``HELP``, ``add_arguments(parser)`` and ``run(args)``; heavy imports happen inside ``run``
so ``--help`` starts fast."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from .errors import UserError
from .accel.memory import keep_freed_memory

COMMANDS = ("pretrain", "supervised", "transfer", "compare", "advise", "visualize", "features", "search", "attack",
            "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contrastive-lw",
        description="Layer-wise contrastive pretraining of conv nets, and transfer studies.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"contrastive_lw.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and return 2 instead of a traceback."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"contrastive_lw.commands.{args.command}")
    keep_freed_memory()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops as cleanly as Ctrl-C
    try:
        return module.run(args) or 0
    except UserError as err:
        print(f"contrastive-lw {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            print(f"contrastive-lw {args.command}: error: out of memory on the device: "
                  "lower --batch-size", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt as err:
        print(f"contrastive-lw {args.command}: interrupted: {err or 'finished layers are kept'}", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}; saved state is kept: run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
