"""Review round three, reading and writing files: hostile download servers (endless, dripping,
lying about their size, redirecting in a loop), special files where a file is expected, and two
writers of one destination, one of them killed.

A hang is bounded by an alarm, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from densenet_efficient import cli
from densenet_efficient.errors import UsageError
from densenet_efficient.io import download as D
from densenet_efficient.io.atomic import atomic_write, remove_stale_temporaries, scratch_folder, staged_folder
from densenet_efficient.io.checkpoint import load_torch_file, read_checkpoint
from densenet_efficient.io.files import NotARegularFileError, require_regular_file
from densenet_efficient.io.json_file import read_json_object

from ..support import REPO
from ..support.sockets import local_server
from ..support.timeouts import within

# -- 8. downloads are bounded --------------------------------------------------------------------


@contextlib.contextmanager
def _server(answer: Callable[[socket.socket, str, threading.Event], None]) -> Iterator[str]:
    """A localhost server calling ``answer(connection, base_url, stop)`` for every connection, each
    in its own thread once the request is read."""

    def accept(conn: socket.socket, base: str, stop: threading.Event) -> None:
        conn.recv(65536)
        threading.Thread(target=_answer, args=(answer, conn, base, stop), daemon=True).start()

    with local_server(accept) as base:
        yield base


def _answer(answer, conn, base, stop) -> None:
    with contextlib.suppress(OSError), conn:
        answer(conn, base, stop)


def _endless(conn, base, stop) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")  # no Content-Length: the body ends when the server says
    while not stop.is_set():
        conn.sendall(b"x" * 65536)


def _dripping(conn, base, stop) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    while not stop.is_set():
        conn.sendall(b"x")  # one byte well within every read timeout
        time.sleep(0.05)


def _lying(conn, base, stop) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000000000000\r\n\r\n" + b"x" * 1000)


def _redirect_loop(conn, base, stop) -> None:
    conn.sendall(f"HTTP/1.0 302 Found\r\nLocation: {base}/again-0123abcd.pth\r\nContent-Length: 0\r\n\r\n".encode())


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setenv(D.DOWNLOAD_TIMEOUT_ENV, "0.5")


@pytest.mark.parametrize(
    ("answer", "max_bytes", "message"),
    [
        (_endless, 300_000, "the server sent more than the expected 300000 bytes"),
        (_lying, 300_000, "the server announced 1000000000000 bytes, more than the expected 300000"),
        (_dripping, None, r"it sent \d+ bytes in 0.\d s, less than 1024 bytes a second"),
        (_redirect_loop, None, "HTTP 30[12] .*redirect"),
    ],
)
def test_a_hostile_server_ends_in_one_line_and_caches_nothing(tmp_path, short_timeout, answer, max_bytes, message):
    cache = tmp_path / "cache"
    with _server(answer) as base, within(30):
        with pytest.raises(D.DownloadError, match=message) as caught:
            D.fetch_state_dict(f"{base}/w-0123abcd.pth", "w-0123abcd.pth", cache, False, max_bytes)
        assert "\n" not in str(caught.value) and base in str(caught.value)
        with pytest.raises(D.DownloadError, match=message):
            D.download_file(f"{base}/w-0123abcd.pth", tmp_path / "file" / "w.pth", False, max_bytes)
    assert os.listdir(cache) == [] and os.listdir(tmp_path / "file") == []


def test_the_manifest_file_size_bounds_a_download(tmp_path, monkeypatch, short_timeout):
    from densenet_efficient.models import weights as W

    from ..support.hub_server import manifest_override

    with _server(_endless) as base, within(30):
        manifest = manifest_override(tmp_path / "manifest.json", {"densenet121": f"{base}/densenet121-0123abcd.pth"})
        monkeypatch.setenv(W.MANIFEST_ENV, str(manifest))
        spec = W.get_weights("densenet121")
        assert spec.max_bytes == int(-(-30.845 * 2**20 * 1.01 // 1)) + 65536
        with pytest.raises(D.DownloadError, match=f"more than the expected {spec.max_bytes} bytes"):
            spec.get_state_dict(progress=False, model_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def test_a_cache_that_cannot_take_the_file_is_named(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(D.DownloadError, match=f"cannot store the download in {blocker / 'cache'}"):
        D.fetch_state_dict("http://127.0.0.1:9/w-0123abcd.pth", "w-0123abcd.pth", blocker / "cache", False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("example.com/w-0123abcd.pth", "is not a valid URL: expected http://host/"),
        ("http://[::1/w-0123abcd.pth", r"is not a valid URL \(Invalid IPv6 URL\)"),
        ("ftp://host/w-0123abcd.pth", "is not a valid URL"),
        ("http:///w-0123abcd.pth", "is not a valid URL"),
    ],
)
def test_urls_urllib_cannot_fetch_are_a_usage_error(tmp_path, url, message):
    with pytest.raises(UsageError, match=message):
        D.download_file(url, tmp_path / "w.pth", progress=False)
    assert os.listdir(tmp_path) == []


# -- 9. special files where a file is expected --------------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "model.pth"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "reader",
    [
        lambda p: read_checkpoint(p),
        lambda p: load_torch_file(p),
        lambda p: read_json_object(p, "a folder"),
        lambda p: D.sha256_file(p),
    ],
    ids=["read_checkpoint", "load_torch_file", "read_json_object", "sha256_file"],
)
def test_a_fifo_where_a_file_is_expected_is_refused_at_once(fifo, reader):
    with within(20), pytest.raises(NotARegularFileError, match=r"it is a FIFO \(named pipe\), expected a regular file"):
        reader(fifo)


def test_devices_and_folders_are_named_for_what_they_are(tmp_path):
    with pytest.raises(NotARegularFileError, match="it is a character device"):
        require_regular_file("/dev/zero", "checkpoint")
    with pytest.raises(NotARegularFileError, match="it is a folder"):
        require_regular_file(tmp_path, "checkpoint")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        require_regular_file(tmp_path / "missing", "checkpoint")
    (tmp_path / "file").write_bytes(b"x")
    os.symlink(tmp_path / "file", tmp_path / "link")
    assert require_regular_file(tmp_path / "link") == tmp_path / "link"  # links to files are fine


def test_a_fifo_checkpoint_on_the_command_line_is_one_line(fifo, tmp_path, capsys):
    with within(30):
        assert cli.main(["convert", str(fifo), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "FIFO" in err and "\n" not in err and not (tmp_path / "out").exists()


# -- 3 and 17. two writers of one destination, one of them killed --------------------------------


def test_a_live_writers_temporary_is_never_taken_for_a_dead_ones(tmp_path):
    path = tmp_path / "checkpoint.pt"
    writing, finish = threading.Event(), threading.Event()
    errors = []

    def slow(f) -> None:
        f.write(b"first ")
        writing.set()
        finish.wait(10)
        f.write(b"writer")

    def first() -> None:
        try:
            atomic_write(path, slow)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    assert writing.wait(10)
    in_flight = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(in_flight) == 1
    atomic_write(path, b"second writer")  # removes what dead writers left for the same file
    assert remove_stale_temporaries(tmp_path, ["checkpoint.pt"]) == []
    assert in_flight[0].exists()
    finish.set()
    thread.join()
    assert errors == [] and path.read_bytes() == b"first writer"


_KILLED = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from densenet_efficient.io.atomic import atomic_write, staged_folder
    out = Path(sys.argv[1])
    with staged_folder(out / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 100_000)
        with staged_folder(tmp / "inner") as inner:  # nested, as convert's save is
            (inner / "config.json").write_text("{}")

            def die(f):
                f.write(b"half")
                os._exit(9)

            atomic_write(out / "log.csv", die)
    """
)


def test_what_a_killed_writer_left_is_removed_by_the_next_writer_of_the_same_destination(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(".model.") and n.endswith(".partial") for n in left)
    assert any(n.startswith(".log.csv.") and n.endswith(".tmp") for n in left)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".model.mine.partial").mkdir()  # not this module's pattern: never touched
    with staged_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    atomic_write(tmp_path / "log.csv", b"epoch\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.mine.partial", "log.csv", "model", "notes.txt"]


def test_a_live_staging_folder_is_not_removed_by_another_writer(tmp_path):
    with scratch_folder(tmp_path / "model") as live:
        (live / "model.safetensors").write_bytes(b"x")
        with staged_folder(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
        assert (live / "model.safetensors").exists()
    assert not live.exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_two_processes_writing_one_file_at_the_same_instant_both_succeed(tmp_path):
    code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from densenet_efficient.io.atomic import atomic_write
        start = float(sys.argv[2])
        while time.time() < start:
            pass
        for i in range(200):
            atomic_write(Path(sys.argv[1]), sys.argv[3].encode() * 1000)
        """
    )
    start = time.time() + 1.5
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "log.csv"), str(start), tag],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)  # fmt: skip
        for tag in ("a", "b")
    ]
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert os.listdir(tmp_path) == ["log.csv"]
    assert (tmp_path / "log.csv").read_bytes() in (b"a" * 1000, b"b" * 1000)


def test_train_pretrained_download_failures_are_one_line(tmp_path, monkeypatch, capsys):
    from densenet_efficient.models import weights as W

    monkeypatch.setenv(W.URL_BASE_ENV, "http://127.0.0.1:9/mirror")  # nothing listens on port 9
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["train", "--arch", "densenet121", "--pretrained", "--n-epochs", "1", "--save", str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densenet-efficient train: error: could not download http://127.0.0.1:9/mirror/")
    assert "\n" not in err and not (tmp_path / "run").exists()
    (tmp_path / "home").write_text("a file where TORCH_HOME should be a folder")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot store the download in {tmp_path / 'home'}" in err and "\n" not in err
    for bad in ("example.com/mirror", "http://[::1/mirror"):
        monkeypatch.setenv(W.URL_BASE_ENV, bad)
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert f"{W.URL_BASE_ENV} {bad!r} is not a valid URL" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_full_torch_home_is_one_line_naming_the_cache(tmp_path, monkeypatch):
    from ..support.disk import mount_tmpfs
    from ..support.hub_server import serve

    served = tmp_path / "served"
    served.mkdir()
    torch.save({"w": torch.zeros(100_000)}, served / "payload")  # 400 KB: more than the room left
    name = f"w-{D.sha256_file(served / 'payload')[:8]}.pth"
    (served / "payload").rename(served / name)
    cache = tmp_path / "cache"
    cache.mkdir()
    mounted = mount_tmpfs(cache)
    try:
        if mounted:
            (cache / "filler").write_bytes(bytes(2048 * 1024 - 40 * 1024))
        else:  # no tmpfs here: a writer failing as a full disk makes it fail
            real = os.fsync

            def full(fd):
                real(fd)
                raise OSError(28, os.strerror(28))

            monkeypatch.setattr(os, "fsync", full)
        with serve(served) as base, pytest.raises(D.DownloadError, match=f"cannot store the download in {cache}: No space left on device"):
            D.fetch_state_dict(f"{base}/{name}", name, cache, False)
        assert sorted(os.listdir(cache)) == (["filler"] if mounted else [])
    finally:
        if mounted:
            subprocess.run(["umount", str(cache)], check=True)


def test_a_download_of_no_stated_size_is_bounded_too(tmp_path, short_timeout, monkeypatch):
    monkeypatch.setattr(D, "MAX_DOWNLOAD_BYTES", 200_000)
    with _server(_endless) as base, within(30), pytest.raises(D.DownloadError, match="more than the expected 200000 bytes"):
        D.download_file(f"{base}/source.pth", tmp_path / "source.pth", progress=False)
    assert os.listdir(tmp_path) == []


def test_a_folder_another_writer_completes_first_is_not_replaced(tmp_path):
    out = tmp_path / "model"
    with (
        pytest.raises(FileExistsError, match="appeared while it was being written; not replacing it"),
        staged_folder(out) as tmp,
    ):
        (tmp / "config.json").write_text("ours")
        out.mkdir()  # the other conversion into the same OUT_DIR finished first
        (out / "config.json").write_text("theirs")
    assert (out / "config.json").read_text() == "theirs" and os.listdir(tmp_path) == ["model"]
    with staged_folder(out, replace=True) as tmp:  # replacing was asked for: each file replaced
        (tmp / "config.json").write_text("ours")
    assert (out / "config.json").read_text() == "ours"
