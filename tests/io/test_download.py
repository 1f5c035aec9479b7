"""Downloads never hang: a server that accepts and never answers costs two timeouts, then one clear
error, and leaves nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from densenet_efficient.errors import UsageError
from densenet_efficient.io import download as D

from ..support.sockets import local_server


@contextlib.contextmanager
def _server(answer_from: int | None, body: bytes = b"") -> Iterator[tuple[str, list[socket.socket]]]:
    """A localhost server that accepts every connection and stays silent on all of them, or answers
    ``body`` from the ``answer_from``-th connection on (1-based). Yields (base URL, connections)."""
    conns: list[socket.socket] = []

    def accept(conn: socket.socket, base: str, stop: threading.Event) -> None:
        conns.append(conn)
        if answer_from is not None and len(conns) >= answer_from:
            conn.recv(65536)
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            conn.sendall(head + body)
            conn.close()

    try:
        with local_server(accept) as base:
            yield base, conns
    finally:
        for c in conns:
            c.close()


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setenv(D.DOWNLOAD_TIMEOUT_ENV, "0.3")


def test_silent_server_times_out_twice_then_fails_clearly(tmp_path, short_timeout):
    with _server(answer_from=None) as (base, conns):
        start = time.monotonic()
        with pytest.raises(OSError, match=r"no answer from .* within 0.3 s \(tried 2 times\).*TIMEOUT"):
            D.download_file(f"{base}/w-0123abcd.pth", tmp_path / "w-0123abcd.pth", progress=False)
        elapsed = time.monotonic() - start
    assert len(conns) == 2  # one retry
    assert elapsed < 5
    assert os.listdir(tmp_path) == []


def test_silent_server_for_pretrained_weights_caches_nothing(tmp_path, short_timeout):
    with (
        _server(answer_from=None) as (base, _),
        pytest.raises(OSError, match="could not download.*no answer"),
    ):
        D.fetch_state_dict(f"{base}/w-0123abcd.pth", "w-0123abcd.pth", model_dir=tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


def test_one_timeout_is_retried(tmp_path, short_timeout):
    payload = tmp_path / "payload"
    torch.save({"w": torch.arange(3.0)}, payload)
    body = payload.read_bytes()
    name = f"w-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    cache = tmp_path / "cache"
    with _server(answer_from=2, body=body) as (base, conns):
        state = D.fetch_state_dict(f"{base}/{name}", name, model_dir=cache, progress=False)
    assert len(conns) == 2
    assert torch.equal(state["w"], torch.arange(3.0))
    assert os.listdir(cache) == [name]


def test_short_body_without_a_hash_is_refused(tmp_path, monkeypatch):
    """No hash in the name: the Content-Length still catches a connection dropped mid-file."""

    def short(conn: socket.socket, base: str, stop: threading.Event) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)

    with local_server(short) as base, pytest.raises(OSError, match="cannot download .*closed after 10 of 1000 bytes"):
        D.download_file(f"{base}/w.pth", tmp_path / "w.pth", False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_bad_timeout_setting_is_a_usage_error(monkeypatch, value):
    monkeypatch.setenv(D.DOWNLOAD_TIMEOUT_ENV, value)
    with pytest.raises(UsageError, match=f"{D.DOWNLOAD_TIMEOUT_ENV} must be a positive number.*{value}"):
        D.download_timeout()


def test_timeout_default_and_setting(monkeypatch):
    monkeypatch.delenv(D.DOWNLOAD_TIMEOUT_ENV, raising=False)
    assert D.download_timeout() == 30.0
    monkeypatch.setenv(D.DOWNLOAD_TIMEOUT_ENV, "2.5")
    assert D.download_timeout() == 2.5
