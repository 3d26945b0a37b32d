"""The command line: ``python -m ptrbridge demo``, ``python -m ptrbridge run`` and ``--version``."""
from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ["main"]

_RUN_DESCRIPTION = """\
Run COMMAND with ptrbridge's checks on in every Python process it starts, then
print the findings (with counts of errors and portability findings), leaks,
how many calls, callbacks and lends were checked, and the C memory counters.

What changes in the program: cffi and ctypes are instrumented (their calls are
checked; --no-instrument turns it off); at level 2, buffers lent to C are
passed as guard-paged shadow copies (--no-quarantine turns it off); and
automatic retention scans record their findings instead of raising
RetainedPointerError in the program (as set_on_violation("collect") does; a
program that calls set_on_violation itself keeps its own choice). ptrbridge is
loaded in a process only when it first imports cffi, ctypes or ptrbridge, and
the process's own sitecustomize still runs.

Exit status: the command's if it failed; else 1 if a finding fails (an error,
or also a portability finding with --strict or PTRBRIDGE_STRICT=1); else 2 if
a --watch-library name matched no loaded library, or a process that imported
cffi or ctypes ran an interpreter that cannot import ptrbridge; else 0."""


def _version() -> str:
    from . import __version__

    return f"ptrbridge {__version__}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptrbridge",
        description="Safe memory passing between Python and C: a tour (demo) and a checker for any "
        "program or test suite (run).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub.required = True
    sub.add_parser(
        "demo",
        help="a tour of the features, printing what each shows",
        description="A guided tour of ptrbridge: each section runs real code across the Python/C "
        "boundary - a pointer mistake or a feature - and prints what ptrbridge reports or does. "
        "Takes no options; prints to stdout.",
    )
    run = sub.add_parser(
        "run",
        help="run a program or test command with the checks on and summarise what was found",
        description=_RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--check", type=int, choices=(0, 1, 2), default=2, metavar="LEVEL",
                     help="check level 0, 1 or 2 (default 2)")
    run.add_argument("--quarantine", dest="quarantine", action="store_true", default=True,
                     help="lend buffers as guard-paged shadow copies at level 2 (the default)")
    run.add_argument("--no-quarantine", dest="quarantine", action="store_false",
                     help="lend buffers directly")
    run.add_argument("--no-instrument", dest="instrument", action="store_false", default=True,
                     help="do not instrument cffi and ctypes: check only libraries wrapped with ptrbridge.wrap")
    run.add_argument("--strict", action="store_true",
                     help="portability findings fail too (Go's rules taken literally, stale pointers C holds)")
    run.add_argument("--watch-library", action="append", default=[], metavar="NAME",
                     help="also scan the globals of the library whose path contains NAME (repeatable)")
    run.add_argument("--report", metavar="FILE.json", help="write the findings as JSON (schema: ptrbridge.report)")
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
                           watch=args.watch_library, report=args.report, strict=args.strict,
                           instrument=args.instrument)
    parser.error(f"unknown command {args.subcommand!r}")  # argparse normally rejects it first
    return 2
