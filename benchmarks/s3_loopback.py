"""A real S3 API on loopback for the object-storage tests and the data benchmark: moto's server
(``moto[server]``, a dev extra) on a free ``127.0.0.1`` port, and the four AWS variables s3fs reads.

tests/ imports this file too (benchmarks/ is not a package; tests put it on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from hyperloop_dist.parallel.launch import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT_S = 60.0


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>``; ``env()`` are the four variables s3fs reads.

    ``process=True`` runs it in a child process (the benchmark: its request handling then takes no time
    from the process being measured); else in threads of this one.
    """

    def __init__(self, process: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._server: Any = None
        if process:
            self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                              "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
            wait_for(self._accepts, START_TIMEOUT_S, f"the moto S3 server (child process) on port {self.port}",
                     alive=lambda: self._process.poll() is None)
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                 client_kwargs={"endpoint_url": self.endpoint},
                                 skip_instance_cache=True)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        else:
            self._server.stop()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` while the block runs, the previous values restored after."""
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


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``predicate`` until it holds; a timeout (or ``alive()`` turning false) names ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if not alive():
            raise RuntimeError(f"{what} exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
