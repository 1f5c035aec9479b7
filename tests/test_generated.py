"""The files written from the model table (scripts/generate_files.py) are current, and the script
finds and rewrites a stale one."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from .support import REPO

GENERATED = ["weights/manifest.json", "hubconf.py", "README.md", "weights/README.md"]


def generator():
    """scripts/generate_files.py as a module."""
    spec = importlib.util.spec_from_file_location("generate_files", REPO / "scripts" / "generate_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_file_is_what_the_table_gives():
    files = generator().generated_files()
    assert sorted(str(p.relative_to(REPO)) for p in files) == sorted(GENERATED)
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} is stale: run python scripts/generate_files.py"
        )


def _copy(tmp_path: Path) -> Path:
    for name in GENERATED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def test_a_stale_part_is_rewritten_and_the_rest_kept(tmp_path):
    copy = _copy(tmp_path)
    readme = copy / "README.md"
    original = readme.read_text(encoding="utf-8")
    readme.write_text(original.replace("| `densenet264` |", "| `densenet263` |"), encoding="utf-8")
    hub = copy / "hubconf.py"
    hub.write_text(
        hub.read_text(encoding="utf-8").replace("def densenet161(", "def densenet16("), encoding="utf-8"
    )
    files = generator().generated_files(copy)
    assert files[readme] == original and files[hub] == (REPO / "hubconf.py").read_text(encoding="utf-8")


def test_a_file_without_its_markers_is_refused_by_name(tmp_path):
    copy = _copy(tmp_path)
    readme = copy / "weights" / "README.md"
    readme.write_text("# Published weights\n\nno table here\n", encoding="utf-8")
    with pytest.raises(
        SystemExit, match=r"weights/README\.md: expected the marker lines .*begin generated: weights"
    ):
        generator().generated_files(copy)


def test_check_names_stale_files_and_writes_nothing(monkeypatch, capsys, tmp_path):
    module = generator()
    copy = _copy(tmp_path)
    (copy / "weights" / "manifest.json").write_text("{}\n", encoding="utf-8")
    monkeypatch.setattr(module, "REPO", copy)
    assert module.main(["--check"]) == 1
    assert capsys.readouterr().out == "stale weights/manifest.json\n"
    assert (copy / "weights" / "manifest.json").read_text() == "{}\n"
    assert module.main([]) == 0 and capsys.readouterr().out == "wrote weights/manifest.json\n"
    assert module.main(["--check"]) == 0
    assert (copy / "weights" / "manifest.json").read_text() == (
        REPO / "weights" / "manifest.json"
    ).read_text()
