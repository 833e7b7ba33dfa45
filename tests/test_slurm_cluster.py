"""`hyperloop submit` against a real single-node SLURM (slurmctld + slurmd + munged, started here).

Two jobs of the tiny recipe run side by side, 2 ranks each under srun + torchrun: one straight through,
one sent USR1 mid-run as SLURM does before a time limit. That one must checkpoint, be requeued, resume
from its checkpoint and end with the same final loss as the uninterrupted job.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import losses
from .slurm_cluster import LocalSlurm, missing_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM/munge not installed (missing: "
                       f"{', '.join(missing_binaries())}); .ci/run installs slurmctld slurmd slurm-client munge"),
]

STEPS = 24


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _submit(slurm: LocalSlurm, profile: Path, run_dir: Path, overrides: list[str]) -> str:
    cmd = [sys.executable, "-m", "hyperloop_dist.cli", "submit", "recipes/tiny-cpu.yaml", "--cluster", str(profile),
           "--run-dir", str(run_dir), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=slurm.env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split("submitted job ")[1].split(":")[0]


def _log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text() if path.is_file() else "(no log)"


def _last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def test_submit_runs_and_requeues_after_usr1(slurm: LocalSlurm, tiny_data: list[str], tmp_path: Path) -> None:
    profile = tmp_path / "local.yaml"
    profile.write_text(f"name: local\nmax_nodes: 1\ncpus_per_task: 2\ntime: '00:10:00'\nsignal_grace_s: 60\n"
                       f"rdzv_port_base: {random.randrange(20000, 40000)}\n")
    overrides = [*tiny_data, f"train.steps={STEPS}", "train.micro_batch_size=4", "train.log_interval=1",
                 "optim.warmup_steps=2", "train.keep_last=2"]
    runs = tmp_path / "runs with spaces"
    straight, interrupted = runs / "straight", runs / "interrupted"
    job_a = _submit(slurm, profile, straight, overrides)
    job_b = _submit(slurm, profile, interrupted, overrides)

    deadline = time.monotonic() + 150
    while _last_logged_step(interrupted) < 3:
        state, _ = slurm.job_state(job_b)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n{_log(interrupted, job_b)}"
        assert time.monotonic() < deadline, _log(interrupted, job_b) + slurm.logs()
        time.sleep(0.1)
    # What SLURM does `signal_grace_s` before the time limit (--signal=B:USR1@grace): USR1 to the batch shell.
    slurm.run("scancel", "--batch", "--signal=USR1", job_b)
    stopped_at = _last_logged_step(interrupted)
    assert stopped_at < STEPS, "the job finished before the signal; raise STEPS"

    for job, run in ((job_a, straight), (job_b, interrupted)):
        state = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=240)
        assert state == "COMPLETED", f"job {job}: {state}\n{_log(run, job)}"

    assert slurm.job_state(job_a)[1] == 0
    assert slurm.job_state(job_b)[1] == 1, "the interrupted job was requeued exactly once"
    log_b = _log(interrupted, job_b)
    assert "USR1" in log_b and "requeueing job" in log_b and "resumed from" in log_b, log_b
    assert "start 1 on localhost" in log_b  # the second start of the same job id

    final = {name: losses(run) for name, run in (("straight", straight), ("interrupted", interrupted))}
    assert sorted(final["interrupted"]) == list(range(1, STEPS + 1))
    assert final["interrupted"][STEPS] == final["straight"][STEPS]
    # The run directory of a submitted job.
    for run in (straight, interrupted):
        assert {"submit.sbatch", "recipe.yaml", "jobs.txt", "config.yaml", "metrics.jsonl"} <= {
            p.name for p in run.iterdir()}
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def test_sweep_runs_a_job_array_through_submitit(slurm: LocalSlurm, tiny_data: list[str], tmp_path: Path) -> None:
    profile = tmp_path / "local.yaml"
    profile.write_text("name: local\nmax_nodes: 1\ncpus_per_task: 1\ntime: '00:10:00'\n")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hyperloop_dist.cli", "sweep", *tiny_data, "parallel.nproc_per_node=1",
           "train.micro_batch_size=2", "train.log_interval=1", "data.workers=0", "--cluster", str(profile),
           "--kinds", "hyperloop", "--out", str(out), "--grid", "train.steps=2,3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=slurm.env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = re.findall(r"^(\d+_\d+) ", proc.stdout, re.MULTILINE)
    assert len(jobs) == 2, proc.stdout  # array elements: <id>_<index>
    for job in jobs:
        state = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
        logs = "".join(p.read_text() for p in (out / ".sweep" / "submitit").rglob("*.out"))
        assert state == "COMPLETED", f"{job}: {state}\n{logs[-3000:]}"
    for steps in (2, 3):
        assert max(losses(out / "hyperloop" / f"steps={steps}")) == steps
