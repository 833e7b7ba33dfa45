"""One command on a laptop or a cluster: join torchrun/srun, or start the local processes ourselves."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable

from hyperloop_dist.config import Config


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
