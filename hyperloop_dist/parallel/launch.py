"""One command on a laptop or a cluster: join torchrun/srun, or start the local processes ourselves."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from hyperloop_dist.config import Config

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def inside_launcher() -> bool:
    """True when torchrun (or srun + torchrun) already started this process as one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: Config, entrypoint: Callable[..., object], *args: object) -> list[object]:
    """Run ``entrypoint(*args)`` on every rank of this node.

    Inside torchrun/srun: call it directly (this process is one rank). Otherwise start
    ``parallel.nproc_per_node`` local processes with torch's elastic launcher (used as a library) on a
    free loopback port; ``nnodes > 1`` needs a cluster launcher. Returns what the entrypoint returned on
    the ranks this process saw (its own, or each local rank's).
    """
    if inside_launcher():
        return [entrypoint(*args)]
    if cfg.parallel.nnodes != 1:
        raise SystemExit(
            f"parallel.nnodes={cfg.parallel.nnodes}: a multi-node run is started by torchrun/srun on every node "
            "(`hyperloop submit` renders the sbatch script); outside a launcher only nnodes=1 runs"
        )
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.threads_per_rank))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.parallel.nproc_per_node,
        run_id=f"hyperloop-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    return list(elastic_launch(config, entrypoint)(*args).values())


def first_failure(exc: ChildFailedError) -> tuple[int, int, str]:
    """(global rank, exit code, "ExceptionType: message") of the rank that failed first.

    Ranks that raised left an error record (the ``record`` decorator, or the hang watchdog); the ranks the
    launcher then stopped did not, and their "signal 15" is not the cause, so recorded errors come first.
    """
    def recorded(failure: object) -> str:
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        return message.strip() if isinstance(message, str) and os.path.isfile(failure.error_file) else ""

    failures = exc.failures.items()
    with_errors = [(f.timestamp, rank, f) for rank, f in failures if recorded(f)]
    if with_errors:
        _, rank, failure = min(with_errors, key=lambda item: (item[0], item[1]))
        return rank, failure.exitcode, recorded(failure).splitlines()[0]
    rank, failure = exc.get_first_failure()
    reason = failure.signal_name() if failure.exitcode < 0 else "see the log above"
    return rank, failure.exitcode, reason
