"""The ``densenet-efficient`` command: one subcommand per job, one module per subcommand here.

Each subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int``; this file
only dispatches, so importing the CLI costs nothing until a subcommand is chosen. A user error
(:class:`CLIError`, the package's :class:`~densenet_efficient.errors.UsageError` and its typed
errors, a missing or existing file) prints one sentence and exits with code 2; anything else is a
bug and keeps its traceback. A reader that closes stdout early (``plan ... | head -1``) ends the
command silently with code 141, as SIGPIPE would.

    densenet-efficient train --depth 100 --n-epochs 300
    python -m densenet_efficient benchmark --arch densenet121 --batch-size 8 --image-size 224
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import UsageError

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "densenet_efficient.cli.train",
        "train a DenseNet-BC (bundled digits, CIFAR) or fine-tune on an ImageFolder",
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


def run_script(prog: str, main: Callable[[], object]) -> int:
    """Run an example's or script's ``main()`` as the command line runs a subcommand: a user error
    prints ``PROG: error: <one sentence>`` and returns 2, an interrupt returns 130, and anything
    else (a bug) keeps its traceback. Use as ``sys.exit(run_script("finetune.py", main))``.

    The examples also fetch this repository through torch.hub, so a machine without a connection
    (torch.hub's ``RuntimeError`` "no internet connection", or a failed download) is one line too.
    """
    import urllib.error

    try:
        main()
    except (*_user_errors(), urllib.error.URLError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "no internet connection" not in str(err):  # torch.hub's words; any other is a bug
            raise
        print(f"{prog}: error: {err}; from a checkout, pass --repo PATH --source local", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


#: What ``densenet-efficient --help`` tells a user (the module docstring is for this package's developers).
DESCRIPTION = """Memory-efficient DenseNets with torchvision's state_dict layout: train or fine-tune
one, convert a checkpoint, measure memory and time per mode, or plan a memory budget."""
EPILOG = """examples:
  densenet-efficient train                      # DenseNet-BC on the bundled digits, no download
  densenet-efficient plan --arch densenet121 --memory 8GiB
  densenet-efficient COMMAND --help             # each command's options"""


def _parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(
        prog="densenet-efficient",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the examples keep their lines
    )
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
