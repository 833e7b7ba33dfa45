"""Sources in object storage or on any fsspec filesystem (``s3://``, ``gs://``, ``hf://``, ``https://``, ...).

* **Listing.** A remote path, directory or glob is listed once, sorted, when the run starts; the data state
  in every checkpoint keeps that listing, so a resumed run reads the same files even if the bucket has
  changed since (:func:`list_files`). It keeps each file's size and ETag too (its *version*): a listed file
  replaced since is an error naming it when the run resumes or when its copy starts, never a silent read
  of other bytes.
* **Reading.** Each shard is copied to a local spool file and parsed there by the same code as a local
  file: the records, their order and the bad-input counters are those of the local file with the same
  bytes. A failure in the middle of a copy resumes the copy at its byte offset, so no record is read twice
  or skipped (remote jsonl is never handed to the ``datasets`` text loader, whose ``encoding=`` s3fs
  rejects).
* **Prefetch.** While a reader tokenizes one shard, the next one of its slot is copied in a background
  thread (:class:`ShardSpool`): network reads overlap tokenization.
* **Failures.** Transient ones (connection refused or reset, timeouts, throttling, 5xx) are retried with
  exponential backoff for ``retry_s`` seconds (:func:`retrying`); permanent ones (403, no such bucket or
  key) raise a DataError naming the source and the fix.

Credentials and endpoints come from the environment as each filesystem documents (s3fs: ``AWS_*``); a
source's ``storage_options`` are passed to its filesystem for the rest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hyperloop_dist.data.errors import DataError

T = TypeVar("T")
COPY_CHUNK = 4 << 20  # bytes per read of a remote shard
MAX_BACKOFF_S = 15.0
# What one attempt may take beyond data.retry_s before the retries give up (botocore's connect and read
# timeouts are 60 s each): the hang watchdog allows a step data.retry_s plus this.
RETRY_MARGIN_S = 90.0
PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL}


class RemoteError(DataError):
    """A remote source cannot be listed or read."""


def is_remote(path: str) -> bool:
    """A path with a protocol other than the local filesystem's."""
    from fsspec.utils import get_protocol

    return "://" in path and get_protocol(path) not in ("file", "local")


def reads_remote(cfg: Any) -> bool:
    """The recipe's training data includes a remote source (a hyperloop_dist.config.Config)."""
    return cfg.data.corpus == "sources" and any(is_remote(s.path) for s in cfg.data.sources)


def has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _filesystem(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:  # the protocol's package (gcsfs, adlfs, ...) is not installed
        raise RemoteError(f"{url}: {exc}; install it with pip") from exc
    except ValueError as exc:  # an unknown protocol
        raise RemoteError(f"{url}: {exc}") from exc


def _permanent(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS


def _transient(exc: BaseException) -> bool:
    """Network and service failures worth retrying; botocore's and aiohttp's errors are not OSErrors."""
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "httpx", "huggingface_hub")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _permanent_message(what: str, url: str, exc: BaseException) -> str:
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
        return (f"{what}: access to {url} is denied ({_first_line(exc)}); check the credentials its filesystem "
                "reads from the environment (s3://: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                "and AWS_ENDPOINT_URL for an S3-compatible store), the bucket's policy, or the source's "
                "storage_options")
    if isinstance(exc, FileNotFoundError):
        return (f"{what}: {url} does not exist ({_first_line(exc)}); check the bucket and path, and the endpoint "
                "(AWS_ENDPOINT_URL) and region the filesystem uses")
    return f"{what}: {url} cannot be read ({_first_line(exc)}); check the path and the source's storage_options"


def changed_message(what: str, path: str, listed: str, now: str) -> str:
    return (f"{what}: {path} has changed since the run listed it ({listed} then, {now} now). A run reads exactly "
            "the files it listed when it started (its checkpoints keep the listing with each file's size and "
            "ETag), so reading other bytes would change the token stream unnoticed: restore the file as it was, "
            "or start a new run (another train.run_dir) to read the source as it is now")


def version(info: dict[str, Any]) -> str:
    """What identifies a remote file's bytes in its fsspec info: size and ETag, those the store gives."""
    etag, size = info.get("ETag") or info.get("etag"), info.get("size")
    parts = ([f"size {size}"] if size is not None else []) + ([f"ETag {str(etag).strip(chr(34))}"] if etag else [])
    return ", ".join(parts)


def changed(listed: str, now: str) -> bool:
    """Two :func:`version` strings differ in a field both have (a listing and a file's own info may not
    give the same fields, e.g. over https)."""
    a, b = (dict(part.split(" ", 1) for part in v.split(", ") if part) for v in (listed, now))
    return any(a[k] != b[k] for k in a.keys() & b.keys())


def gone_message(what: str, path: str) -> str:
    return (f"{what}: {path} was listed when the run started and is gone now. A run reads exactly the files it "
            "listed then (its checkpoints keep the listing), so a missing one is an error, never a skip: restore "
            "the file, or start a new run (another train.run_dir) to read the source as it is now")


def retrying(attempt: Callable[[], T], what: str, url: str, retry_s: float) -> T:
    """``attempt()``, retried with exponential backoff while it fails transiently, for up to ``retry_s`` s.

    Each attempt must continue where the previous one stopped (a copy resumes at its byte offset), so a
    retried read yields exactly what an uninterrupted one would.
    """
    deadline, delay, tries = time.monotonic() + retry_s, 0.5, 0
    while True:
        try:
            return attempt()
        except RemoteError:
            raise
        except Exception as exc:
            if _permanent(exc):
                raise RemoteError(_permanent_message(what, url, exc)) from exc
            if not _transient(exc):
                raise
            tries += 1
            if time.monotonic() + delay > deadline:
                raise RemoteError(f"{what}: {url} still fails after {tries} tries in {retry_s:g} s "
                                  f"({_first_line(exc)}); check the endpoint and the network, or allow longer "
                                  "outages with data.retry_s") from exc
            print(f"warning: {what}: {url}: {_first_line(exc)}; retry {tries} in {delay:.1f} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)


def list_files(what: str, pattern: str, storage_options: dict[str, Any], retry_s: float,
               suffixes: tuple[str, ...]) -> dict[str, str]:
    """The URLs a remote file, directory (files with one of ``suffixes``) or glob names, sorted, each with
    its :func:`version`."""
    fs, path = _filesystem(pattern, storage_options)

    def listing() -> dict[str, str]:
        fs.invalidate_cache()  # a listing cached earlier in this process is not the bucket now
        if has_glob(path):
            found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
        elif fs.isdir(path):
            found = {p: info for p, info in fs.find(path, detail=True).items() if Path(p).suffix in suffixes}
        else:
            found = {path: fs.info(path)} if fs.isfile(path) else {}
        if not found:
            _explain_nothing(fs, path, pattern)
        return {fs.unstrip_protocol(p): version(found[p]) for p in sorted(found)}

    return retrying(listing, what, pattern, retry_s)


def _explain_nothing(fs: Any, path: str, pattern: str) -> None:
    """Nothing listed: a missing bucket (or no access to it) says so; fsspec's glob just returns []."""
    root = path.strip("/").split("/")[0]
    if root and root != path.strip("/"):
        fs.ls(root)  # FileNotFoundError (no such bucket) or PermissionError: permanent, named by retrying()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_spools(prefix: str) -> None:
    """Spool folders of processes that died without cleaning up (a SIGKILL-ed loader worker)."""
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = d.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


class ShardSpool:
    """Local copies of one reader's remote shards: the one being read, and the next one copied ahead.

    ``ready``/``waited`` count the shards whose prefetched copy was complete / not (still in flight, or
    none: the first shard) when the reader reached them, and ``wait_s`` the seconds it waited for copies
    (the benchmark reports them). ``versions``: the listed :func:`version` of each URL,
    checked as each copy starts.
    """

    def __init__(self, what: str, storage_options: dict[str, Any], retry_s: float,
                 versions: dict[str, str] | None = None) -> None:
        self.what, self.storage_options, self.retry_s = what, storage_options, retry_s
        self.versions = versions or {}
        self.ready = self.waited = self.copied = 0
        self.wait_s = 0.0
        self._dir: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[str, str, Future[str]] | None = None  # (url, local path, its copy)
        self._serial = 0

    def _local_path(self) -> str:
        if self._dir is None:
            prefix = f"hyperloop-spool-{socket.gethostname()}-"
            _clean_stale_spools(prefix)
            self._dir = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._serial += 1
        return os.path.join(self._dir, f"shard-{self._serial}")

    def copy(self, url: str, dest: str) -> str:
        """Copy ``url`` to ``dest``; a retry continues at the bytes already there."""
        fs, path = _filesystem(url, self.storage_options)

        def attempt() -> str:
            done = os.path.getsize(dest) if os.path.exists(dest) else 0
            fs.invalidate_cache(path)  # (the listing's cached details are not the file now)
            try:
                with fs.open(path, "rb") as src, open(dest, "ab") as out:
                    self._check_version(url, src, fs, path)
                    if done:
                        src.seek(done)
                    while chunk := src.read(COPY_CHUNK):
                        out.write(chunk)
            except FileNotFoundError as exc:
                raise RemoteError(gone_message(self.what, url)) from exc
            return dest

        try:
            result = retrying(attempt, self.what, url, self.retry_s)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(dest)
            raise
        self.copied += 1
        return result

    def _check_version(self, url: str, src: Any, fs: Any, path: str) -> None:
        listed = self.versions.get(url)
        if listed:
            now = version(getattr(src, "details", None) or fs.info(path))
            if changed(listed, now):
                raise RemoteError(changed_message(self.what, url, listed, now))

    def _take(self, url: str) -> str:
        start = time.perf_counter()
        try:
            return self._ready_copy(url)
        finally:
            self.wait_s += time.perf_counter() - start

    def _ready_copy(self, url: str) -> str:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead_url, local, copying = ahead
            if ahead_url == url:
                self.ready += copying.done()
                self.waited += not copying.done()
                return copying.result()
            with contextlib.suppress(Exception):  # a prefetch the reader did not follow (a resume jumped)
                copying.result()
            with contextlib.suppress(OSError):
                os.remove(local)
        self.waited += 1
        return self.copy(url, self._local_path())

    def _prefetch(self, url: str) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        local = self._local_path()
        self._ahead = (url, local, self._pool.submit(self.copy, url, local))

    def close(self) -> None:
        """Stop the prefetch (waiting for a copy in flight) and delete the spool: nothing reads on after."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[2].cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @contextlib.contextmanager
    def shard(self, url: str, next_url: str | None = None, in_order: bool = True) -> Iterator[str]:
        """The local copy of ``url`` while the block runs (deleted after); ``next_url`` is copied meanwhile.
        ``in_order=False``: a look at a shard outside the reading order, which leaves the prefetch alone."""
        local = self._take(url) if in_order else self.copy(url, self._local_path())
        if next_url is not None:
            self._prefetch(next_url)
        try:
            yield local
        finally:
            with contextlib.suppress(OSError):
                os.remove(local)
