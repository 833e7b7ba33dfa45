"""Faults in front of the loopback S3 server (benchmarks/s3_loopback.py): a TCP proxy that takes the network
down for a while when a chosen request passes (connections reset, new ones refused), and a server that
answers every request with S3's 403 AccessDenied.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from hyperloop_dist.parallel.launch import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from s3_loopback import S3Server, environment  # (benchmarks/ is not a package)

__all__ = ["FlakyProxy", "S3Server", "environment", "forbidding_server"]


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees a reset connection, as in a network fault. The
    shutdown wakes the pump blocked in ``recv`` on it, which would otherwise hold the socket open."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    sock.close()


@dataclass
class _Trigger:
    method: str
    key: str  # the object key a request line must name
    after_bytes: int  # response bytes let through before the outage
    seconds: float


class _Connection:
    """One client connection and its upstream; ``cut_in``: response bytes left before the outage."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.cut_in: int | None = None
        self.trigger: _Trigger | None = None


class FlakyProxy:
    """Forwards ``127.0.0.1:port`` to ``target_port``.

    ``outage_on(method, key, after_bytes, seconds)``: when the first request ``method /bucket/key`` passes,
    ``after_bytes`` bytes of its response get through, then every open connection is reset and the port
    refuses connections for ``seconds``. The trigger is a request, not a time or a byte count, so the outage
    hits that read whatever the timing of the others. ``hit`` is the request line that set it off.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.outages = 0
        self.hit: str | None = None
        self._trigger: _Trigger | None = None
        self._open: set[_Connection] = set()
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._closed = False
        self._listener = self._listen()
        self._up.set()
        self._timers: list[threading.Timer] = []
        self._acceptor = threading.Thread(target=self._accept, name="flaky-proxy", daemon=True)
        self._acceptor.start()

    def _listen(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        return sock

    def outage_on(self, method: str, key: str, after_bytes: int, seconds: float) -> None:
        self._trigger = _Trigger(method, key, after_bytes, seconds)

    def _accept(self) -> None:
        while not self._closed:
            self._up.wait()
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed for an outage, or stop()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            conn = _Connection(client, upstream)
            with self._lock:
                self._open.add(conn)
            threading.Thread(target=self._requests, args=(conn,), daemon=True).start()
            threading.Thread(target=self._responses, args=(conn,), daemon=True).start()

    def _requests(self, conn: _Connection) -> None:
        with self._pumping(conn):
            while chunk := conn.client.recv(65536):
                trigger, line = self._trigger, chunk.split(b"\r\n", 1)[0].decode("latin-1")
                if trigger and line.startswith(f"{trigger.method} ") and f"/{trigger.key}" in line.split(" ")[1]:
                    self._trigger, self.hit, conn.trigger, conn.cut_in = None, line, trigger, trigger.after_bytes
                conn.upstream.sendall(chunk)

    def _responses(self, conn: _Connection) -> None:
        with self._pumping(conn):
            while chunk := conn.upstream.recv(65536):
                if conn.cut_in is not None:
                    conn.client.sendall(chunk[:conn.cut_in])
                    conn.cut_in -= len(chunk)
                    if conn.cut_in <= 0:
                        self._go_down(conn.trigger.seconds)
                        return
                    continue
                conn.client.sendall(chunk)

    @contextlib.contextmanager
    def _pumping(self, conn: _Connection):
        try:
            yield
        except OSError:
            pass
        finally:
            for s in (conn.client, conn.upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _go_down(self, seconds: float) -> None:
        self.outages += 1
        self._up.clear()
        self._close_listener()  # new connections: refused
        with self._lock:
            open_now, self._open = self._open, set()
        for conn in open_now:
            _reset(conn.client)
            _reset(conn.upstream)
        timer = threading.Timer(seconds, self._come_back)
        self._timers.append(timer)
        timer.start()

    def _close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # (wakes the blocked accept())
        self._listener.close()

    def _come_back(self) -> None:
        if not self._closed:
            self._listener = self._listen()
            self._up.set()

    def stop(self) -> None:
        """Close everything and join the proxy's threads (the pumps end with their sockets)."""
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        self._close_listener()
        self._up.set()
        self._acceptor.join(timeout=10)
        with self._lock:
            open_now, self._open = self._open, set()
        for conn in open_now:
            _reset(conn.client)
            _reset(conn.upstream)


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
