"""A real single-node SLURM cluster in a temporary directory: munged, slurmctld and slurmd from Debian's
packages (``.ci/run`` installs them), each on private sockets and ports, stopped by ``stop()``.

Settings that keep it self-contained: munged on its own socket and key (``AuthInfo=socket=``),
``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroups needed), no accounting,
root as the SLURM user, ``cred_expire=5`` so a requeued job may start again after ~6 s (SLURM's default
120 s), and a 1 s scheduler interval. The node is called ``localhost`` so that ``scontrol show
hostnames`` in the sbatch template yields an address that resolves to loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch")
NODE = "localhost"


def missing_binaries() -> list[str]:
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin") for name in DAEMONS}
    return [name for name, path in found.items() if path is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin") or name


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 4) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    def _config(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=hltest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",  # the node may claim more CPUs than the machine has
            "ReturnToService=2",
            "KillWait=30",
            f"NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def start(self, timeout: float = 30.0) -> LocalSlurm:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        self.conf.write_text(self._config())
        key = r / "munge" / "munge.key"
        subprocess.run([_bin("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._daemon([_bin("munged"), f"--socket={r}/munge/munge.socket", f"--key-file={key}",
                      f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                      f"--seed-file={r}/munge/seed", "--force"], r / "munge" / "munged.pid")
        self._daemon([_bin("slurmctld"), "-f", str(self.conf), "-i"], r / "slurmctld.pid")
        self._daemon([_bin("slurmd"), "-f", str(self.conf), "-N", NODE], r / "slurmd.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"SLURM did not come up in {timeout} s: {self.logs()}")

    def _daemon(self, argv: list[str], pid_file: Path) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr}{self.logs()}")
        self._pid_files.append(pid_file)
        for _ in range(50):  # daemons write their pid file just after forking
            if pid_file.is_file() and pid_file.read_text().strip():
                return
            time.sleep(0.05)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, check=check)

    def job_state(self, job_id: str) -> tuple[str, int]:
        """(JobState, Restarts) from scontrol."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", "0"))

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state, _ = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {state} after {timeout} s")

    def logs(self) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.is_file():
                tails.append(f"\n--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "".join(tails)

    def stop(self) -> None:
        """Cancel every job and wait for it to leave, stop slurmd, slurmctld and munged (each by the pid it
        wrote), then end any process still holding a file of this cluster (a job step's slurmstepd, whose
        slurmd is gone, would otherwise linger)."""
        self.run("scancel", "--full", "--user=root", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.25)
        for pid_file in reversed(self._pid_files):
            try:
                _terminate(int(pid_file.read_text().strip()))
            except (OSError, ValueError):
                continue
        self._pid_files.clear()
        for pid in self._processes_using_root():
            _terminate(pid)

    def _processes_using_root(self) -> list[int]:
        root, found = str(self.root), []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if any(os.readlink(fd).startswith(root) for fd in (proc / "fd").iterdir()):
                    found.append(int(proc.name))
            except OSError:
                continue  # gone, or not ours to inspect
        return found


def _terminate(pid: int, wait_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
