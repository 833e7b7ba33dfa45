"""``hyperloop submit``: one sbatch script from the project's template, a run directory, ``sbatch``.

The run directory (``train.run_dir``, made absolute) holds everything about the job::

    submit.sbatch   the rendered script (what was submitted)
    recipe.yaml     the resolved recipe every start of the job trains (overrides applied)
    jobs.txt        job ids submitted for this run directory, one a line
    logs/           slurm-<jobid>.out (appended to across requeues)
    config.yaml, metrics.jsonl, checkpoints/, wandb/   written by `hyperloop train`
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from hyperloop_dist.cluster.profile import ClusterProfile
from hyperloop_dist.config import Config, ConfigError, dump_config
from hyperloop_dist.train import engines
from hyperloop_dist.train.hang import HANG_REQUEUES
from hyperloop_dist.train.signals import REQUEUE_EXIT

TEMPLATE_DIR = Path(__file__).parent / "templates"
_UNSAFE_IN_DIRECTIVE = ('"', "\n", "%", "$", "`", "\\")  # #SBATCH lines are not shell: no quoting beyond "..."


@dataclass
class Job:
    cfg: Config  # train.run_dir absolute
    profile: ClusterProfile
    run_dir: Path
    script: str


def _check_directive_path(what: str, path: Path) -> None:
    bad = [c for c in _UNSAFE_IN_DIRECTIVE if c in str(path)]
    if bad:
        raise ConfigError(f"{what} {str(path)!r} contains {', '.join(map(repr, bad))}: sbatch cannot quote that "
                          "in an #SBATCH line; choose a path without it (spaces are fine)")


def check_fits(cfg: Config, profile: ClusterProfile) -> None:
    """The recipe's parallel layout against what a node of the profile offers."""
    p = cfg.parallel
    if p.nnodes > profile.max_nodes:
        raise ConfigError(f"parallel.nnodes={p.nnodes}: profile {profile.name!r} allows at most max_nodes="
                          f"{profile.max_nodes}; lower parallel.nnodes or use another profile")
    if profile.gpus_per_node and p.nproc_per_node > profile.gpus_per_node:
        raise ConfigError(f"parallel.nproc_per_node={p.nproc_per_node}: profile {profile.name!r} has "
                          f"gpus_per_node={profile.gpus_per_node}; one rank per GPU")
    if not profile.gpus_per_node and p.nproc_per_node > profile.cpus_per_task:
        raise ConfigError(f"parallel.nproc_per_node={p.nproc_per_node}: profile {profile.name!r} is a CPU profile "
                          f"with cpus_per_task={profile.cpus_per_task}; give each rank a core")
    if profile.gpus_per_node and p.backend == "gloo":
        raise ConfigError(f"parallel.backend='gloo' on GPU profile {profile.name!r}: use auto (nccl)")


def render(cfg: Config, profile: ClusterProfile, run_dir: Path, workdir: Path, recipe_name: str,
           python: str | None = None) -> str:
    """The sbatch script for ``cfg`` on ``profile`` (a pure function of its arguments)."""
    _check_directive_path("run directory", run_dir)
    _check_directive_path("working directory", workdir)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    nproc = cfg.parallel.nproc_per_node
    return env.get_template("sbatch.sh.j2").render(
        cfg=cfg, p=profile, run_dir=run_dir, workdir=workdir, recipe_name=recipe_name,
        job_name=f"hl-{recipe_name}"[:64], nodes=cfg.parallel.nnodes, nproc=nproc,
        python=python or profile.python or sys.executable,
        threads=max(1, profile.cpus_per_task // nproc), requeue_exit=REQUEUE_EXIT, hang_requeues=HANG_REQUEUES,
        # torchrun waits this long for its ranks to checkpoint after forwarding a signal; SLURM's own
        # deadline is the grace period, minus a margin for the requeue itself.
        shutdown_timeout=max(10, profile.signal_grace_s - 15),
    )


def prepare(cfg: Config, profile: ClusterProfile, recipe_name: str, run_dir: str | Path | None = None,
            workdir: str | Path | None = None) -> Job:
    """Resolve the run directory, check the layout against the profile, render the script."""
    root = Path(workdir or Path.cwd()).resolve()
    run = Path(run_dir or cfg.train.run_dir)
    run = (run if run.is_absolute() else root / run).resolve()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run)))
    engines.validate(cfg)
    check_fits(cfg, profile)
    return Job(cfg, profile, run, render(cfg, profile, run, root, recipe_name))


def write_run_dir(job: Job) -> Path:
    """Create the run directory with its logs/, the resolved recipe and the script; returns the script."""
    (job.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    dump_config(job.cfg, job.run_dir / "recipe.yaml")
    script = job.run_dir / "submit.sbatch"
    script.write_text(job.script)
    script.chmod(0o755)
    return script


def sbatch(script: Path) -> str:
    """Submit; returns the job id. Needs `sbatch` on PATH (and SLURM_CONF where the cluster needs it)."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH: run `hyperloop submit` on a SLURM login node, or use --dry-run "
                          "to print the script")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    with (script.parent / "jobs.txt").open("a") as f:
        f.write(job_id + "\n")
    return job_id
