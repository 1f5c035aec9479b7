"""The ``densenet-efficient`` command: one subcommand per job, one module per subcommand here.

Each subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int``; this file
only dispatches, so importing the CLI costs nothing until a subcommand is chosen. A user error
(:class:`CLIError`, the package's :class:`~densenet_efficient.errors.UsageError` and its typed
errors, a missing or existing file) prints one sentence and exits with code 2; anything else is a
bug and keeps its traceback. A reader that closes stdout early (``plan ... | head -1``) ends the
command silently with code 141, as SIGPIPE would.

    densenet-efficient train --depth 100 --n-epochs 300
    python -m densenet_efficient benchmark --arch densenet121 --batch-size 8 --resolution 224
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from ..errors import UsageError

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "densenet_efficient.cli.train",
        "train DenseNet-BC on CIFAR/an embedded data set, or fine-tune",
    ),
    "convert": (
        "densenet_efficient.cli.convert",
        "convert any DenseNet checkpoint to a verified hub-ready folder",
    ),
    "benchmark": ("densenet_efficient.cli.benchmark", "measure training-step memory and time per mode"),
    "plan": ("densenet_efficient.cli.plan", "estimate peak training memory and the largest batch that fits"),
}


class CLIError(UsageError):
    """A user error found by the command line itself: printed as one sentence, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "bad input", not "bug" (imported late: the CLI stays cheap to load)."""
    from ..io.download import DownloadError, WeightsIntegrityError
    from ..io.state_dict import StateDictMismatchError

    return (
        UsageError,
        DownloadError,
        StateDictMismatchError,
        WeightsIntegrityError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
    )


def _parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="densenet-efficient", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:  # only the chosen subcommand's module is imported
            importlib.import_module(module).configure_parser(p)
    return parser, chosen


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, chosen = _parser(argv)
    args = parser.parse_args(argv)
    if chosen is None or args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that left is answered below, not by a traceback
        return code
    except BrokenPipeError:
        # `densenet-efficient plan ... | head -1`: the reader has what it wanted. Exit as a process
        # killed by SIGPIPE would (128 + 13), silently; the interpreter's own final flush then finds
        # stdout pointing at /dev/null instead of raising again.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _user_errors() as err:
        print(f"densenet-efficient {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
