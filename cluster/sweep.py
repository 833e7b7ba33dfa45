"""``hyperloop sweep``: a scaling-law grid (sizes x tokens x kinds) as one SLURM job array via submitit.

Each array element is the same ``hyperloop train`` with its point's overrides, in its own run directory
``<out>/<kind>/<axis>=<value>,...``. One SLURM task per rank (submitit's srun), so the ranks join through
the environment submitit exports (RANK, WORLD_SIZE, MASTER_ADDR, ...), as under torchrun.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from hyperloop_dist.cluster.profile import ClusterProfile
from hyperloop_dist.config import Config, ConfigError
from hyperloop_dist.model.hyper_connections import KINDS
from hyperloop_dist.train.entry import load_items


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


def train_point(argv: list[str]) -> int:
    """What each array element runs (pickled by submitit): join the job's ranks, then `hyperloop train`."""
    import submitit

    from hyperloop_dist.train.entry import train

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    status = train(argv)
    if status:
        raise SystemExit(status)
    return status


def submit_sweep(recipe: str | None, base_overrides: list[str], profile: ClusterProfile, axes: list[str],
                 kinds: list[str], out: Path, dry_run: bool = False) -> list[tuple[Path, str]]:
    """Validate every point, then submit them as one job array; returns (run dir, job id) per point."""
    import submitit

    points = grid_points(axes, kinds)
    runs: list[tuple[list[str], Path, Config]] = []
    for point in points:
        run_dir = point_dir(out.resolve(), point)
        argv = [*([recipe] if recipe else []), *base_overrides, *point, f"train.run_dir={run_dir}"]
        cfg = load_items(argv, layout=True)  # every point checked first
        if cfg.parallel.nnodes > profile.max_nodes:
            raise ConfigError(f"{' '.join(point)}: parallel.nnodes={cfg.parallel.nnodes} > max_nodes "
                              f"{profile.max_nodes} of profile {profile.name!r}")
        runs.append((argv, run_dir, cfg))
    if dry_run:
        return [(run_dir, "dry-run") for _, run_dir, _ in runs]
    nodes = max(cfg.parallel.nnodes for _, _, cfg in runs)
    ranks = max(cfg.parallel.nproc_per_node for _, _, cfg in runs)
    if any((c.parallel.nnodes, c.parallel.nproc_per_node) != (nodes, ranks) for _, _, c in runs):
        raise ConfigError("sweep points must share parallel.nnodes and parallel.nproc_per_node (one job array)")
    executor = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster="slurm")
    hours, minutes, seconds = _time_parts(profile.time)
    extra = {"requeue": True} if profile.requeue else {}
    if profile.account:
        extra["account"] = profile.account
    executor.update_parameters(
        name="hl-sweep", nodes=nodes, tasks_per_node=ranks, cpus_per_task=max(1, profile.cpus_per_task // ranks),
        timeout_min=max(1, hours * 60 + minutes + (seconds > 0)), slurm_partition=profile.partition,
        slurm_qos=profile.qos, slurm_gpus_per_node=profile.gpus_per_node or None,
        slurm_signal_delay_s=profile.signal_grace_s, slurm_setup=list(profile.setup),
        slurm_additional_parameters=extra, slurm_array_parallelism=len(runs),
    )
    for _, run_dir, _ in runs:
        run_dir.mkdir(parents=True, exist_ok=True)
    jobs = executor.map_array(train_point, [argv for argv, _, _ in runs])
    return [(run_dir, job.job_id) for (_, run_dir, _), job in zip(runs, jobs, strict=True)]


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
