"""``hyperloop sweep``: a scaling-law grid (sizes x tokens x kinds), on SLURM or on this machine.

Every point is the same ``hyperloop train`` with its point's overrides, in its own run directory
``<out>/<kind>/<axis>=<value>,...``, so ``hyperloop scaling fit <out>/*/*`` reads them all. The sweep's own
bookkeeping (submitit's folder, local logs, the point list) goes to ``<out>/.sweep/``, which a shell's
``*`` does not match.

* ``--cluster PROFILE``: one SLURM job array through submitit, one SLURM task per rank (submitit's srun),
  so the ranks join through the environment submitit exports (RANK, WORLD_SIZE, MASTER_ADDR, ...).
* ``--local``: plain ``hyperloop train`` processes on this machine, ``--parallel K`` points at a time
  (default 1: each point already starts ``parallel.nproc_per_node`` ranks of its own).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hyperloop_dist.cluster.profile import ClusterProfile
from hyperloop_dist.config import Config, ConfigError
from hyperloop_dist.model.hyper_connections import KINDS
from hyperloop_dist.train.entry import load_items

BOOKKEEPING = ".sweep"  # under --out; hidden from the `OUT/*/*` glob the fit command uses


def grid_points(axes: list[str], kinds: list[str]) -> list[list[str]]:
    """``["model.hidden_size=64,128", "train.steps=50,100"]`` x kinds -> one override list per point."""
    parsed = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or "." not in key or not values:
            raise ConfigError(f"--grid {axis!r}: expected section.field=v1,v2,... e.g. model.hidden_size=64,128")
        parsed.append([f"{key}={v}" for v in values.split(",")])
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
    return [[f"model.kind={kind}", *combo] for kind in kinds for combo in itertools.product(*parsed)]


def point_dir(out: Path, point: list[str]) -> Path:
    kind = point[0].split("=", 1)[1]
    name = ",".join(p.split(".", 1)[1] for p in point[1:]) or "base"
    return out / kind / name.replace("/", "_")


@dataclass
class SweepPoint:
    overrides: list[str]  # the point's own (model.kind=..., grid values)
    argv: list[str]  # everything after `hyperloop train`
    run_dir: Path
    cfg: Config


def plan_sweep(recipe: str | None, base_overrides: list[str], axes: list[str], kinds: list[str],
               out: Path) -> list[SweepPoint]:
    """Every point's config, loaded and validated before anything runs."""
    points = []
    for point in grid_points(axes, kinds):
        run_dir = point_dir(out.resolve(), point)
        argv = [*([recipe] if recipe else []), *base_overrides, *point, f"train.run_dir={run_dir}"]
        cfg = load_items(argv, layout=True)
        points.append(SweepPoint(point, argv, run_dir, cfg))
    return points


def train_point(argv: list[str]) -> int:
    """What each array element runs (pickled by submitit): join the job's ranks, then `hyperloop train`."""
    import submitit

    from hyperloop_dist.train.entry import train

    # submitit seeds its port choice with the job id alone, and job ids repeat across clusters (every test
    # cluster starts at 1): two sweeps sharing a host then collide. Every rank derives the same port from
    # the job id and the point's own arguments.
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    if "MASTER_PORT" not in os.environ:
        key = f"{os.environ.get('SLURM_JOB_ID', '')}:{' '.join(argv)}"
        dist_env.master_port = 20000 + zlib.crc32(key.encode()) % 40000
    dist_env.export(set_cuda_visible_devices=False)
    status = train(argv)
    if status:
        raise SystemExit(status)
    return status


def submit_sweep(points: list[SweepPoint], profile: ClusterProfile, out: Path) -> list[tuple[Path, str]]:
    """Submit the points as one job array; returns (run dir, job id) per point."""
    import submitit

    for p in points:
        if p.cfg.parallel.nnodes > profile.max_nodes:
            raise ConfigError(f"{' '.join(p.overrides)}: parallel.nnodes={p.cfg.parallel.nnodes} > max_nodes "
                              f"{profile.max_nodes} of profile {profile.name!r}")
    nodes = max(p.cfg.parallel.nnodes for p in points)
    ranks = max(p.cfg.parallel.nproc_per_node for p in points)
    if any((p.cfg.parallel.nnodes, p.cfg.parallel.nproc_per_node) != (nodes, ranks) for p in points):
        raise ConfigError("sweep points must share parallel.nnodes and parallel.nproc_per_node (one job array)")
    executor = submitit.AutoExecutor(folder=out / BOOKKEEPING / "submitit" / "%j", cluster="slurm")
    hours, minutes, seconds = _time_parts(profile.time)
    extra = {"requeue": True} if profile.requeue else {}
    if profile.account:
        extra["account"] = profile.account
    executor.update_parameters(
        name="hl-sweep", nodes=nodes, tasks_per_node=ranks, cpus_per_task=max(1, profile.cpus_per_task // ranks),
        timeout_min=max(1, hours * 60 + minutes + (seconds > 0)), slurm_partition=profile.partition,
        slurm_qos=profile.qos, slurm_gpus_per_node=profile.gpus_per_node or None,
        slurm_signal_delay_s=profile.signal_grace_s, slurm_setup=list(profile.setup),
        slurm_additional_parameters=extra, slurm_array_parallelism=len(points),
    )
    for p in points:
        p.run_dir.mkdir(parents=True, exist_ok=True)
    _write_points(points, out)
    jobs = executor.map_array(train_point, [p.argv for p in points])
    return [(p.run_dir, job.job_id) for p, job in zip(points, jobs, strict=True)]


@dataclass
class LocalResult:
    point: SweepPoint
    status: int
    seconds: float
    log: Path


def run_local(points: list[SweepPoint], out: Path, parallel: int = 1,
              progress: Callable[[str], None] = print) -> list[LocalResult]:
    """Train the points as plain ``hyperloop train`` processes, ``parallel`` at a time.

    A failed point does not stop the others (its status and log are in the result); each point's output
    goes to ``<out>/.sweep/logs/<kind>/<name>.log``.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel={parallel}: run at least 1 point at a time")
    _write_points(points, out)
    pending, running, results = list(enumerate(points, 1)), [], []
    while pending or running:
        while pending and len(running) < parallel:
            index, point = pending.pop(0)
            rel = point.run_dir.relative_to(out.resolve())
            log = out / BOOKKEEPING / "logs" / rel.parent / f"{rel.name}.log"  # (names may hold dots: lr=0.003)
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = log.open("w")
            proc = subprocess.Popen([sys.executable, "-m", "hyperloop_dist.cli", "train", *point.argv],
                                    stdout=handle, stderr=subprocess.STDOUT)
            progress(f"[{index}/{len(points)}] started  {' '.join(point.overrides)} (log {log})")
            running.append((index, point, proc, handle, log, time.monotonic()))
        time.sleep(0.2)
        for item in [r for r in running if r[2].poll() is not None]:
            index, point, proc, handle, log, start = item
            handle.close()
            running.remove(item)
            results.append(LocalResult(point, proc.returncode, time.monotonic() - start, log))
            state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log})"
            progress(f"[{index}/{len(points)}] {state} {' '.join(point.overrides)} in {results[-1].seconds:.0f} s")
    order = {id(p): i for i, p in enumerate(points)}
    return sorted(results, key=lambda r: order[id(r.point)])


def _write_points(points: list[SweepPoint], out: Path) -> None:
    book = out / BOOKKEEPING
    book.mkdir(parents=True, exist_ok=True)
    (book / "points.json").write_text(json.dumps(
        [{"run_dir": str(p.run_dir), "overrides": p.overrides, "argv": p.argv} for p in points], indent=1))


def _time_parts(text: str) -> tuple[int, int, int]:
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        parts = [0, parts[0], 0]  # SLURM: a bare number is minutes
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return hours + 24 * int(days or 0), minutes, seconds


if __name__ == "__main__":  # pragma: no cover - a manual entry point for one point
    sys.exit(train_point(sys.argv[1:]))
