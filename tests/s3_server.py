"""A real S3 API on loopback for the object-storage tests and benchmark: moto's server (``moto[server]``) on a
free port, a TCP proxy in front of it that can go down for a while (connections reset, new ones refused),
and a server that answers every request with S3's 403 AccessDenied.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

from hyperloop_dist.parallel.launch import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>``; ``env()`` are the four variables s3fs reads."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                 client_kwargs={"endpoint_url": self.endpoint},
                                 skip_instance_cache=True)

    def stop(self) -> None:
        self._server.stop()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees a reset connection, as in a network fault."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class FlakyProxy:
    """Forwards ``127.0.0.1:port`` to ``target_port``. ``outage_after(n, seconds)``: once ``n`` response
    bytes have passed, every open connection is reset and the port refuses connections for ``seconds``."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self.forwarded = self.outages = 0
        self._trigger: tuple[int, float] | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._closed = False
        self._listener = self._listen()
        self._listening.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _listen(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        return sock

    def outage_after(self, n_bytes: int, seconds: float) -> None:
        self._trigger = (self.forwarded + n_bytes, seconds)

    def _accept(self) -> None:
        while not self._closed:
            self._listening.wait()
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed for an outage
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        try:
            while chunk := src.recv(16384):
                dst.sendall(chunk)
                if response:
                    self.forwarded += len(chunk)
                    if self._trigger and self.forwarded >= self._trigger[0]:
                        self._go_down(self._trigger[1])
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _go_down(self, seconds: float) -> None:
        self._trigger = None
        self.outages += 1
        self._listening.clear()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # (wakes the blocked accept())
        self._listener.close()  # new connections: refused
        with self._lock:
            open_now, self._open = self._open, set()
        for sock in open_now:
            _reset(sock)
        threading.Timer(seconds, self._come_back).start()

    def _come_back(self) -> None:
        self._listener = self._listen()
        self._listening.set()

    def stop(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listening.set()


class _Forbidden(http.server.BaseHTTPRequestHandler):
    BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>")

    def _deny(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_HEAD = do_PUT = do_POST = _deny

    def log_message(self, *args: object) -> None:
        pass


def forbidding_server() -> tuple[str, http.server.ThreadingHTTPServer]:
    """An endpoint that answers S3's 403 AccessDenied to everything (what wrong credentials get)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
