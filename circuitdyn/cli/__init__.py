"""The `circuitdyn` command: argument parsing, one-line errors and progress, nothing else.

Each module here adds subcommands with ``register(subparsers)`` and calls the library; the
library never imports this package. Errors the user can fix (bad options, missing or damaged
files, an existing run) end the command with one line that names the problem and the fix, and
exit status 2; Ctrl-C exits with 130 and says how to continue. Anything else is a bug and keeps
its traceback. Under torchrun, rank 0 prints the errors that every rank meets alike.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from circuitdyn.cli import experiments, formation, runs, scores, tune
from circuitdyn.cli.common import CliError, UserErrors, one_line
from circuitdyn.distributed import PeerError, PeerLostError
from circuitdyn.store import StoreLockedError

_MODULES = (scores, tune, runs, experiments, formation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitdyn",
        description="Find circuits, circuit-tune them, and record how they change while a "
        "model learns.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TransformerLens 3.x warns that HookedTransformer is deprecated (removed in 4.0, which we
    # exclude by the version pin). Silence it for our command only, never for library users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
        warnings.filterwarnings("ignore", message=".*deprecated", category=DeprecationWarning)
        args = build_parser().parse_args(argv)

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            print(f"circuitdyn {args.command}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show  # restored when catch_warnings exits
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            hint = getattr(args, "resume_hint", None)
            print(
                f"\ncircuitdyn {args.command}: interrupted; {hint or 'nothing to resume'}",
                file=sys.stderr,
            )
            return 130
        except PeerError:  # rank 0 of the torchrun job prints the error
            return 2
        except PeerLostError as error:  # another rank died: say so, without a traceback
            print(f"circuitdyn {args.command}: error: {one_line(error)}", file=sys.stderr)
            return 1
        except (CliError, StoreLockedError, *UserErrors) as error:
            print(f"circuitdyn {args.command}: error: {one_line(error)}", file=sys.stderr)
            return 2


__all__ = ["build_parser", "main"]
