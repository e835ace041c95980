"""How every command line of the project ends on an error: the library raises its errors with the fix in the message
(a missing file, a bad option, a model that does not match an index, ...), so a user needs that message, not the
traceback of the code that found the problem.

    if __name__ == "__main__":
        run_cli(main)          # main(argv): the CLI's own function

`run_cli` prints such an error (or a CLI's own `raise SystemExit("message")`) as one `PROG: error: MESSAGE` line on
stderr and exits with status 1. `--debug` anywhere on the command line (taken off before `main` sees it) lets the
error propagate with its traceback; so do errors that the project's code did not raise (a bug, or a third-party
failure it does not know), except OSErrors (a file, a permission, the network), which are always a matter of the
environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_HELP = "on an error, show its traceback (default: one message naming the fix)"
# Errors the project raises on purpose, each with its fix; a TypeError or AttributeError there is a bug instead.
MESSAGE_ERRORS = (ValueError, OSError, RuntimeError, LookupError)
# The project's importable packages (the examples' scripts are recognized by their folder, see `_raised_by_us`).
PACKAGES = ("modeling_spn4cir", "datasets_scripts", "trainers", "spn_recipe")


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """List `--debug` in the parser's `--help` (`run_cli` takes it off the command line before parsing; the parsed
    namespace has no `debug`, so that options passed on as keyword arguments stay as they were)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}.")


def renamed_option(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Make `old` (an option name users may know, e.g. from the original code's command line) an error naming its
    new name `new` (with what it means), instead of argparse's bare "unrecognized arguments"; not in `--help`."""
    parser.add_argument(old, action=_Renamed, new=new)


def take_debug_flag(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether `--debug` was given, the arguments without it). A `--debug` followed by a value is left alone: it
    is `TrainingArguments.debug` (e.g. `--debug underflow_overflow`), not this switch."""
    argv, kept, debug = list(argv), [], False
    for i, arg in enumerate(argv):
        if arg == DEBUG_FLAG and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            debug = True
        else:
            kept.append(arg)
    return debug, kept


def error_message(error: BaseException) -> str:
    """The error's own text (a KeyError's without the quotes `str` adds), or its type when it has none."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def _raised_by_us(error: BaseException, main: Callable) -> bool:
    """Whether the innermost frame of the error's traceback is the project's code: one of `PACKAGES`, or a script
    in the folder of the CLI's `main` (the examples import each other by file name)."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    frame = traceback.tb_frame
    if frame.f_globals.get("__name__", "").split(".")[0] in PACKAGES:
        return True
    here = Path(main.__code__.co_filename).resolve().parent
    return Path(frame.f_code.co_filename).resolve().parent == here


def run_cli(main: Callable, argv: Sequence[str] | None = None):
    """`main(argv)` (default argv: `sys.argv[1:]`), its errors reported as described in the module docstring."""
    debug, argv = take_debug_flag(sys.argv[1:] if argv is None else argv)
    if debug:
        return main(argv)
    try:
        return main(argv)
    except SystemExit as stop:
        # `raise SystemExit("message")` in a CLI is an error too: the same one-line form (argparse's own exits carry
        # a status, printed already, and pass through).
        if not isinstance(stop.code, str):
            raise
        _report(stop.code)
    except MESSAGE_ERRORS as error:
        if not (isinstance(error, OSError) or _raised_by_us(error, main)):
            raise
        _report(f"{error_message(error)}\n(run again with {DEBUG_FLAG} for the traceback)")


def _report(message: str) -> NoReturn:
    """Print `message` as the CLI's one error line and exit with status 1."""
    prog = Path(sys.argv[0]).name or "spn4cir"
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(1) from None


__all__ = ["DEBUG_FLAG", "DEBUG_HELP", "add_debug_flag", "error_message", "renamed_option", "run_cli",
           "take_debug_flag"]
