"""The command line: ``python -m ptrbridge demo`` and ``python -m ptrbridge run``."""
from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptrbridge",
        description="Safe memory passing between Python and C.",
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub.required = True
    sub.add_parser("demo", help="a tour of every feature, printing what each shows")
    run = sub.add_parser(
        "run",
        help="run a program or test command with the checks on and summarise what was found",
        description="Run COMMAND with ptrbridge's checks on in every Python process it starts, "
        "then print the findings, leaks and C memory counters. Exit status: the command's if it "
        "failed, 1 if anything was found, else 0.",
    )
    run.add_argument("--check", type=int, choices=(0, 1, 2), default=2, metavar="LEVEL",
                     help="check level (default 2)")
    run.add_argument("--quarantine", action="store_true",
                     help="lend buffers as guard-paged shadow copies (level 2)")
    run.add_argument("--watch-library", action="append", default=[], metavar="NAME",
                     help="also scan the globals of the library whose path contains NAME (repeatable)")
    run.add_argument("--report", metavar="FILE.json", help="write the findings as JSON")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                     help="the command to run, after --")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.subcommand == "demo":
        from .demo import run_demo

        return run_demo()
    if args.subcommand == "run":
        from .runner import run_command

        command = list(args.argv)
        if command and command[0] == "--":
            command = command[1:]
        return run_command(command, check=args.check, quarantine=args.quarantine,
                           watch=args.watch_library, report=args.report)
    parser.error(f"unknown command {args.subcommand!r}")  # argparse normally rejects it first
    return 2
