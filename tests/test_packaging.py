"""What a package index shows and pip installs: licence, project links, extras named for what they enable."""

from __future__ import annotations

import configparser

from densenet_efficient.errors import EXTRAS
from densenet_efficient.models.hub import HUB_REPO, PACKAGE_LICENSE

from .support import REPO


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _requirements(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_extras_are_what_the_refusals_name():
    """errors.EXTRAS (what a command missing one tells the user to install) is setup.cfg's extras;
    [test] installs every one of them, so the suite runs every optional code path."""
    extras = _setup_cfg()["options.extras_require"]
    for name, (_, requirements) in EXTRAS.items():
        assert _requirements(extras[name]) == list(requirements), name
    assert set(extras) == {*EXTRAS, "test", "dev"}
    test = _requirements(extras["test"])
    assert all(r in test for _, requirements in EXTRAS.values() for r in requirements)


def test_licence_file_matches_the_metadata():
    meta = _setup_cfg()["metadata"]
    assert meta["license"] == "MIT" == PACKAGE_LICENSE.upper()
    assert meta["license_files"].strip() == "LICENSE"
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")


def test_project_urls_point_at_the_repository():
    meta = _setup_cfg()["metadata"]
    repo = f"https://github.com/{HUB_REPO}"
    urls = dict(line.split(" = ") for line in _requirements(meta["project_urls"]))
    assert meta["url"] == repo and urls["Source"] == repo and urls["Issues"] == f"{repo}/issues"
    assert "naive speed" not in meta["description"]  # the summary promises only what is measured
