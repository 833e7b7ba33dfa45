"""Hang detection: a watchdog thread per rank that ends a job whose ranks stop making progress.

A rank stuck in a collective (a dead or wedged peer, a deadlock, a hung filesystem) otherwise waits out the
backend timeout, or forever on gloo, and says nothing. The trainer reports progress as *beats*: entering a
section (``setup``, ``step``, ``eval``, ``checkpoint``) and points inside a step (data fetched, backward
done). Each section has its own allowance; a step's is ``train.hang_timeout_s`` or, by default,
``max(120 s, 10 x the median step time)`` once the warm-up steps are measured; with remote data sources
the floor is ``data.retry_s`` + 90 s where that is more, so an outage the data pipeline is still retrying
is not reported as a hang (the retries give up first, with an error naming the source).

When a rank's allowance runs out (a *trip*), or it sees another rank's trip marker in
``<run_dir>/hang/``, it writes its Python stacks (``faulthandler``, every thread; NCCL's flight recorder
on GPU) and its last beat there. The first rank to trip waits briefly for the others, names the ranks that
are furthest behind, and every rank exits with :data:`HANG_EXIT`. The run directory is the channel because
it is already shared by every rank (checkpoints need that), and the process group may be the thing that hangs.

Fault injection: ``HYPERLOOP_INJECT_HANG=STEP@RANK`` sleeps forever at the start of that 1-based step on
that rank (every rank without ``@RANK``); ``HYPERLOOP_INJECT_SLOW=RANK:SECONDS`` delays every step there;
``HYPERLOOP_INJECT_EVAL_ERROR=STEP@RANK`` makes the evaluation after that step raise.
"""

from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

HANG_EXIT = 3  # a rank the watchdog ended, with train.requeue_on_hang (else 1, as any failure)
HANG_REQUEUES = 3  # the sbatch script requeues a hung job while SLURM_RESTART_COUNT is below this
WARMUP_STEPS = 5  # steps whose times do not count towards the automatic step allowance
MIN_STEP_TIMEOUT_S = 120.0
STEP_TIMEOUT_FACTOR = 10.0
STRAGGLER_RATIO = 1.2  # a rank whose median step compute time is this much over the ranks' median

_active: HangWatchdog | None = None


class HangDetected(RuntimeError):
    """Recorded as the rank's error (the launcher prints it) when the watchdog ends the job."""


@dataclass(frozen=True)
class Allowances:
    setup_s: float
    step_s: float | None  # None: automatic (setup allowance until warmed up, then from the step times)
    checkpoint_s: float
    min_step_s: float = MIN_STEP_TIMEOUT_S  # the automatic step allowance's floor

    def __post_init__(self) -> None:
        for name in ("setup_s", "checkpoint_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hang allowance {name} must be > 0")


def section(name: str, step: int) -> None:
    """The training thread enters ``name`` (setup, step, eval, checkpoint); a no-op without a watchdog."""
    if _active is not None:
        _active.section(name, step)


def beat(phase: str) -> None:
    """Progress inside the current section (a no-op without a watchdog): engines call this."""
    if _active is not None:
        _active.beat(phase)


def stop() -> None:
    """End this rank's watchdog (the training function is leaving)."""
    if _active is not None:
        _active.stop()


def median_compute_s() -> float | None:
    """This rank's median step compute time (step start to backward done), for the straggler report."""
    return _active.median_compute_s() if _active is not None else None


def archive_reports(run_dir: Path) -> None:
    """Rank 0, before the watchdogs start: move an earlier attempt's ``hang/`` aside (kept as evidence)."""
    reports = run_dir / "hang"
    if reports.is_dir():
        n = 1
        while (run_dir / f"hang.{n}").exists():
            n += 1
        reports.rename(run_dir / f"hang.{n}")


def injected(var: str, step: int, rank: int) -> bool:
    """Whether fault-injection variable ``var`` (``STEP[@RANK],...``, 1-based steps) names ``step`` on ``rank``."""
    entries = [e.strip() for e in os.environ.get(var, "").split(",") if e.strip()]
    try:
        hits = [(int(e.partition("@")[0]), int(e.partition("@")[2]) if "@" in e else None) for e in entries]
    except ValueError:
        raise SystemExit(f"{var}={os.environ[var]!r}: expected STEP@RANK[,STEP@RANK...], e.g. 5@1") from None
    return any(s == step and r in (None, rank) for s, r in hits)


def inject_eval_error(step: int, rank: int) -> None:
    """``HYPERLOOP_INJECT_EVAL_ERROR=STEP[@RANK]``: the evaluation after that step raises (a drill)."""
    if injected("HYPERLOOP_INJECT_EVAL_ERROR", step, rank):
        raise RuntimeError(f"HYPERLOOP_INJECT_EVAL_ERROR: evaluation after step {step} failed on rank {rank}")


def inject_faults(step: int, rank: int) -> None:
    """The fault-injection hooks at the start of 1-based ``step`` (tests and drills only)."""
    slow = os.environ.get("HYPERLOOP_INJECT_SLOW")
    if slow:
        who, _, seconds = slow.partition(":")
        if int(who) == rank:
            time.sleep(float(seconds))
    if injected("HYPERLOOP_INJECT_HANG", step, rank):
        print(f"[rank {rank}] HYPERLOOP_INJECT_HANG: sleeping forever at the start of step {step}", flush=True)
        while True:
            time.sleep(3600)


class HangWatchdog:
    """Per rank: ``section``/``beat`` from the training thread, checks in a daemon thread."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, attempt: str, allowances: Allowances,
                 requeue: bool = False, poll_s: float = 1.0, marker_poll_s: float = 5.0,
                 grace_s: float = 15.0, what: str = "training") -> None:
        self.dir = run_dir / "hang"
        self.what = what  # named in the verdict, e.g. "deepspeed engine"
        self.requeue = requeue
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self.allowances = allowances
        self.poll_s, self.marker_poll_s, self.grace_s = poll_s, marker_poll_s, grace_s
        self.section_name, self.step, self.progress, self.phase = "setup", 0, 0, "start"
        self.last_beat = time.monotonic()
        self.step_started = self.last_beat
        self.compute_times: deque[float] = deque(maxlen=1000)  # step start -> backward done, per step
        self.step_times: deque[float] = deque(maxlen=1000)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hyperloop-hang-watchdog", daemon=True)

    # ---------------------------------------------------------------- training thread

    def start(self, watch: bool = True) -> HangWatchdog:
        """Take beats (for the step-time report); with ``watch``, also check them in the thread."""
        global _active
        _active = self
        if watch:
            self._thread.start()
        return self

    def stop(self) -> None:
        global _active
        self._stop.set()
        if _active is self:
            _active = None

    def section(self, name: str, step: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self.section_name == "step":  # a step ends where the next section begins
                self.step_times.append(now - self.step_started)
            if name == "step":
                self.step_started = now
            self.section_name, self.step, self.phase = name, step, "start"
            self.progress += 1
            self.last_beat = now

    def beat(self, phase: str) -> None:
        now = time.monotonic()
        with self._lock:
            if phase == "backward" and self.section_name == "step":
                self.compute_times.append(now - self.step_started)
            self.phase = phase
            self.progress += 1
            self.last_beat = now

    def allowance(self) -> float:
        a = self.allowances
        if self.section_name == "setup":
            return a.setup_s
        if self.section_name in ("checkpoint", "eval"):
            return max(a.checkpoint_s, a.step_s or 0.0)
        if a.step_s is not None:
            return a.step_s
        measured = list(self.step_times)[WARMUP_STEPS:]
        if not measured:
            return a.setup_s  # the first steps compile, allocate and warm caches
        return max(a.min_step_s, STEP_TIMEOUT_FACTOR * statistics.median(measured))

    def median_compute_s(self) -> float | None:
        times = list(self.compute_times)[1:] or list(self.compute_times)  # the first step is warm-up
        return statistics.median(times) if times else None

    # ---------------------------------------------------------------- watchdog thread

    def _state(self) -> dict[str, object]:
        with self._lock:
            return {"rank": self.rank, "section": self.section_name, "step": self.step, "phase": self.phase,
                    "progress": self.progress, "stalled_s": round(time.monotonic() - self.last_beat, 1),
                    "allowance_s": round(self.allowance(), 1), "pid": os.getpid(), "attempt": self.attempt}

    def _marker(self) -> dict[str, object] | None:
        try:
            marker = json.loads((self.dir / "tripped.json").read_text())
        except (OSError, ValueError):
            return None
        return marker if marker.get("attempt") == self.attempt else None

    def _watch(self) -> None:
        next_marker_check = 0.0
        while not self._stop.wait(self.poll_s):
            state = self._state()
            if state["stalled_s"] > state["allowance_s"]:
                self._trip(state, first=self._claim(state))
                return
            now = time.monotonic()
            if now >= next_marker_check:
                next_marker_check = now + self.marker_poll_s
                if self._marker() is not None:
                    self._trip(state, first=False)
                    return

    def _claim(self, state: dict[str, object]) -> bool:
        """Create the trip marker; False when another rank's trip got there first."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.dir / "tripped.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._marker() is None  # an old attempt's marker: archived at start, so rare; take over
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        return True

    def _trip(self, state: dict[str, object], first: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dump_stacks(state)
        (self.dir / f"rank_{self.rank:05d}.json").write_text(json.dumps(state))
        if first:
            verdict = self._verdict(state)
            if self.requeue:
                (self.dir / "requeue").write_text(self.attempt)  # read by the sbatch script
            tmp = self.dir / "verdict.txt.tmp"
            tmp.write_text(verdict)
            tmp.replace(self.dir / "verdict.txt")
            print(f"\nhyperloop: HANG: {verdict}", file=sys.stderr, flush=True)
        else:
            verdict = self._wait_for_verdict()
        _end_rank(HangDetected(verdict), HANG_EXIT if self.requeue else 1)

    def _dump_stacks(self, state: dict[str, object]) -> None:
        with open(self.dir / f"rank_{self.rank:05d}.txt", "w") as f:
            f.write(f"rank {self.rank} (pid {os.getpid()}): section {state['section']}, step {state['step']}, "
                    f"last beat '{state['phase']}' {state['stalled_s']} s ago (allowance {state['allowance_s']} s)\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        _dump_nccl_flight_recorder(self.dir / f"nccl_rank_{self.rank:05d}.pkl")

    def _beats(self) -> dict[int, dict[str, object]]:
        beats = {}
        for path in self.dir.glob("rank_*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("attempt") == self.attempt:
                beats[int(data["rank"])] = data
        return beats

    def _verdict(self, state: dict[str, object]) -> str:
        deadline = time.monotonic() + self.grace_s
        beats = self._beats()
        while len(beats) < self.world_size and time.monotonic() < deadline:
            time.sleep(0.5)
            beats = self._beats()
        return f"{self.what}: {describe_hang(beats, self.world_size, state, self.dir)}"

    def _wait_for_verdict(self) -> str:
        deadline = time.monotonic() + self.grace_s + 10
        while time.monotonic() < deadline:
            try:
                return (self.dir / "verdict.txt").read_text()
            except OSError:
                time.sleep(0.5)
        return f"rank {self.rank}: another rank tripped the hang watchdog; stacks in {self.dir}"


def describe_hang(beats: dict[int, dict[str, object]], world_size: int, tripped: dict[str, object],
                  where: Path) -> str:
    """One line: which ranks are furthest behind (the likely culprits), in which section and step."""
    missing = sorted(set(range(world_size)) - set(beats))
    if beats:
        key = {r: (int(b["step"]), int(b["progress"])) for r, b in beats.items()}
        least = min(key.values())
        behind = sorted(r for r, k in key.items() if k == least)
        b = beats[behind[0]]
        if len(behind) < len(beats):
            ranks = "rank " + ", ".join(map(str, behind)) if len(behind) <= 8 else f"{len(behind)} ranks"
            who = (f"{ranks} stopped making progress in section '{b['section']}' at step {b['step']} "
                   f"(last beat '{b['phase']}'); the other ranks wait for it")
        else:
            who = (f"every rank stopped making progress in section '{b['section']}' at step {b['step']} "
                   f"(last beat '{b['phase']}'): a collective, the filesystem or the data source")
    else:
        who = f"rank {tripped['rank']} stopped making progress"
    absent = f"; no answer from rank(s) {', '.join(map(str, missing[:16]))}" if missing else ""
    return (f"{who}; no progress for {tripped['stalled_s']} s (allowance {tripped['allowance_s']} s, "
            f"train.hang_timeout_s){absent}; Python stacks of every rank in {where}/")


def _dump_nccl_flight_recorder(path: Path) -> None:
    """NCCL's flight recorder (the collectives each rank issued and their state), where there is one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return
        from torch._C._distributed_c10d import _dump_nccl_trace  # (torch's private name, may move)

        path.write_bytes(_dump_nccl_trace())
    except Exception as exc:  # a report of a report: never let it block the exit
        path.with_suffix(".txt").write_text(f"NCCL flight recorder not available: {exc}\n")


def _end_rank(error: BaseException, code: int) -> None:
    """Record ``error`` where the launcher reads rank errors, stop loader workers, and exit now: the
    training thread is stuck and cannot run Python's normal exit (which would wait for it)."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)
    except Exception:
        pass
    from hyperloop_dist.parallel.distributed import reap_children

    reap_children(grace_s=0.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def straggler_rows(medians: list[float | None]) -> list[tuple[str, str]]:
    """Summary rows from every rank's median step compute time (rank order)."""
    known = {r: m for r, m in enumerate(medians) if m is not None}
    if len(known) < 2:
        return []
    typical = statistics.median(known.values())
    slow = {r: m for r, m in known.items() if m > STRAGGLER_RATIO * typical}
    values = sorted(known.values())
    rows = [("step compute time per rank (median)",
             ", ".join(f"r{r} {m * 1e3:.0f} ms" for r, m in known.items()) if len(known) <= 8 else
             f"min {values[0] * 1e3:.0f} / median {typical * 1e3:.0f} / max {values[-1] * 1e3:.0f} ms")]
    if slow:
        rows.append(("STRAGGLERS (> 20% over the median)",
                     ", ".join(f"rank {r} {m / typical:.2f}x" for r, m in sorted(slow.items())[:16])))
    return rows
