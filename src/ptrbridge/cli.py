"""The command line: ``python -m ptrbridge demo``."""
from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptrbridge",
        description="Safe memory passing between Python and C.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("demo", help="a tour of every feature, printing what each shows")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo()
    return 2  # pragma: no cover - argparse rejects unknown commands
