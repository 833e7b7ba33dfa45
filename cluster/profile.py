"""Cluster profiles: what a SLURM cluster offers and how to ask for it (``cluster/profiles/*.yaml``).

A profile describes the machine, not the run: partition/account/qos, GPUs and CPUs per node, the
wall-clock limit, how early before it the job is warned (``--signal=B:USR1@grace``), and the shell
set-up a compute node needs. The recipe's ``parallel`` section says how many nodes and ranks a run
uses; ``hyperloop submit`` checks the two against each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hyperloop_dist.config import ConfigError, build_section

PROFILES_DIR = Path(__file__).parent / "profiles"

_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")  # SLURM's time formats: MM, HH:MM:SS, D-HH:MM:SS ...
_MEM = re.compile(r"^\d+[KMGT]?$")
_WORD = re.compile(r"^[A-Za-z0-9_.,:+=@/-]+$")  # a value that needs no quoting in an #SBATCH line
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ClusterProfile:
    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    max_nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU nodes (gloo)
    cpus_per_task: int = 2  # one task per node: torchrun and all its ranks share these
    mem: str | None = None  # per node, SLURM syntax ("480G", "0" = all)
    time: str = "01:00:00"
    exclusive: bool = False
    signal_grace_s: int = 90  # USR1 this many seconds before the time limit: finish the step, save, requeue
    requeue: bool = True
    python: str | None = None  # interpreter on the compute nodes; None = the one running `hyperloop submit`
    rdzv_port_base: int = 29500  # c10d rendezvous port = base + job id % 1000 (jobs may share a node)
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, source ...)
    env: dict[str, str] = field(default_factory=dict)  # extra environment (NCCL_SOCKET_IFNAME, ...)
    sbatch_extra: list[str] = field(default_factory=list)  # further sbatch options, e.g. "--reservation=x"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_profile(p: ClusterProfile, where: str) -> None:
    _require(bool(_WORD.match(p.name)), f"{where}: name={p.name!r}: letters, digits and _.-, no spaces")
    for name in ("partition", "account", "qos", "constraint"):
        value = getattr(p, name)
        _require(value is None or bool(_WORD.match(value)),
                 f"{where}: {name}={value!r}: must be one word (no spaces, quotes or newlines)")
    for name in ("max_nodes", "cpus_per_task", "signal_grace_s"):
        _require(getattr(p, name) > 0, f"{where}: {name}={getattr(p, name)!r}: must be > 0")
    _require(p.gpus_per_node >= 0, f"{where}: gpus_per_node={p.gpus_per_node}: must be >= 0 (0 = CPU nodes)")
    _require(bool(_TIME.match(p.time)),
             f"{where}: time={p.time!r}: use SLURM's format, e.g. 30, 04:00:00 or 2-00:00:00")
    _require(p.mem is None or bool(_MEM.match(p.mem)), f"{where}: mem={p.mem!r}: e.g. 480G, 64000M or 0 (all)")
    _require(1024 <= p.rdzv_port_base <= 64000,
             f"{where}: rdzv_port_base={p.rdzv_port_base}: must be in 1024..64000 (the job id adds up to 999)")
    _require(p.python is None or "\n" not in p.python, f"{where}: python: must be one path")
    for i, line in enumerate(p.setup):
        _require("\n" not in line, f"{where}: setup[{i}]: one shell line per entry (no newlines)")
    for key in p.env:
        _require(bool(_ENV_NAME.match(key)), f"{where}: env.{key}: not a valid environment variable name")
    for i, opt in enumerate(p.sbatch_extra):
        _require(opt.startswith("--") and bool(_WORD.match(opt)),
                 f"{where}: sbatch_extra[{i}]={opt!r}: one long sbatch option like --reservation=name")


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A profile file, or the name of one shipped in cluster/profiles/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = PROFILES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
    raise ConfigError(f"cluster profile {str(name_or_path)!r} does not exist; pass a YAML file or one of: {known}")


def load_profile(name_or_path: str | Path) -> ClusterProfile:
    path = resolve_profile_path(name_or_path)
    where = f"cluster profile {str(path)!r}"
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    try:
        profile = build_section(ClusterProfile, tree)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    validate_profile(profile, where)
    return profile
