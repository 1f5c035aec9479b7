"""The command line: every subcommand and flag is pinned; user errors exit 2, bugs keep their traceback."""

from __future__ import annotations

import argparse
import importlib

import pytest

from densenet_efficient import cli

#: Each subcommand's positional arguments and flags (train's --memory, --accum-steps: training to a budget).
FLAGS = {
    "train": ([], [
        "--accum-steps", "--amp", "--arch", "--batch-size", "--channels-last", "--compile", "--data",
        "--dataset", "--depth", "--deterministic", "--device", "--download", "--drop-rate", "--freeze-features",
        "--growth-rate", "--image-size", "--lr", "--memory", "--memory-efficient", "--mode", "--momentum",
        "--n-epochs", "--no-download", "--no-progress", "--overwrite", "--pretrained", "--resume", "--save", "--seed", "--stop-after",
        "--sync-bn", "--valid-size", "--weight-decay", "--workers",
    ]),
    "convert": (["src", "out_dir"], [
        "--all-torchvision", "--arch", "--checkpoint-key", "--model-dir", "--no-verify", "--num-classes",
        "--quiet",
    ]),
    "benchmark": ([], [
        "--arch", "--batch-size", "--compile-ours", "--compiled-budgets", "--depth", "--device",
        "--growth-rate", "--image-size", "--json", "--markdown", "--modes", "--no-compiled", "--no-speed",
        "--out", "--quiet", "--rounds", "--steps", "--sweep", "--values",
    ]),
    "plan": ([], [
        "--amp", "--arch", "--batch-size", "--channels-last", "--depth", "--device", "--drop-rate", "--dtype",
        "--freeze-features", "--growth-rate", "--image-size", "--json", "--memory", "--mode", "--optimizer",
        "--sync-bn", "--torchvision",
    ]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_subcommand_flags_are_pinned(name):
    parser = argparse.ArgumentParser()
    importlib.import_module(cli.SUBCOMMANDS[name][0]).configure_parser(parser)
    flags = sorted(o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help"))
    positional = [a.dest for a in parser._actions if not a.option_strings]
    assert (positional, flags) == FLAGS[name]


def test_subcommands_are_pinned():
    assert sorted(cli.SUBCOMMANDS) == sorted(FLAGS)


def test_user_error_prints_one_line_and_exits_2(capsys):
    assert cli.main(["plan", "--memory", "8GiB", "--depth", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["densenet-efficient plan: error: DenseNet-BC depth must be of the form 6n+4 with n >= 1 "
                   "(e.g. 10, 16), got 7"]  # fmt: skip


def test_a_bug_is_not_dressed_up_as_a_user_error(monkeypatch):
    """A plain ValueError from inside the library is a bug: it must keep its traceback."""
    import densenet_efficient.cli.plan as plan_cli

    def broken(*args, **kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(plan_cli, "plan", broken)
    with pytest.raises(ValueError, match="internal invariant broken"):
        cli.main(["plan", "--memory", "8GiB"])


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_help_is_written_for_users(capsys):
    """``densenet-efficient --help`` says what the tool does and how to start, not how it is built."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert cli.DESCRIPTION.split("\n")[0] in out and "densenet-efficient COMMAND --help" in out
    assert all(f"    {name}" in out for name in cli.SUBCOMMANDS)
    assert "module per subcommand" not in out  # the developers' docstring stays out of it
    for line in cli.EPILOG.splitlines()[1:]:  # the examples parse as written
        argv = line.split("#")[0].split()[1:]
        if "COMMAND" not in argv:
            cli._parser(argv)[0].parse_args(argv)
