"""The one atomic writer: whole files or nothing, new folders complete or absent, others' files untouched."""

from __future__ import annotations

import os

import pytest

from densenet_efficient.io.atomic import atomic_write, staged_folder


def test_atomic_write_replaces_content_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "log.csv"
    atomic_write(path, b"a\n")
    atomic_write(path, lambda f: f.write(b"b\n"))
    assert path.read_bytes() == b"b\n"
    assert os.listdir(path.parent) == ["log.csv"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not left private like a mkstemp file


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_new_folder_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "a" / "b" / "model"
    with pytest.raises(RuntimeError), staged_folder(out) as tmp:
        (tmp / "x").write_text("1")
        raise RuntimeError("killed half-way")
    assert os.listdir(tmp_path) == []  # the parents it created are gone too
    with staged_folder(out) as tmp:
        (tmp / "x").write_text("1")
    assert sorted(os.listdir(out)) == ["x"]
    assert os.listdir(out.parent) == ["model"]


def test_existing_folder_is_refused_unless_replacing_and_others_files_survive(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "x").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"), staged_folder(out):
        pass
    with staged_folder(out, replace=True) as tmp:
        (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "new"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"), staged_folder(tmp_path / "f", replace=True):
        pass


@pytest.mark.parametrize("exists", [False, True])
def test_staged_files_follow_the_umask_even_when_written_private(tmp_path, exists):
    """safetensors' save_file creates its file 0600; the saved folder's files must all follow the
    umask like the files open() writes beside them."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "model"
    if exists:
        out.mkdir()
    old_mask = os.umask(0o022)
    try:
        with staged_folder(out, replace=True) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            fd = os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old_mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {"model.safetensors": 0o644, "private.bin": 0o644, "sub": 0o755, "config.json": 0o644}
    assert out.stat().st_mode & 0o777 == 0o755
