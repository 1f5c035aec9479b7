"""A localhost TCP server for the download tests: hostile servers are a callback each."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def local_server(on_connection: Callable[[socket.socket, str, threading.Event], None]) -> Iterator[str]:
    """Accept connections on a free localhost port until the block ends, calling
    ``on_connection(connection, base_url, stop)`` for each in the accepting thread (``stop`` is set
    when the block ends: a long answer runs in its own thread and checks it). Yields the base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            on_connection(conn, base, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield base
    finally:
        stop.set()
        thread.join()
        listener.close()
