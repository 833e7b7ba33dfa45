"""`hyperloop submit --dry-run`: the rendered sbatch script for every shipped profile, without a cluster."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from hyperloop_dist.cli import main
from hyperloop_dist.cluster.profile import PROFILES_DIR, load_profile
from hyperloop_dist.cluster.submit import prepare
from hyperloop_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(PROFILES_DIR.glob("*.yaml"))


def _recipe_for(profile: Path) -> list[str]:
    p = load_profile(profile)
    if p.gpus_per_node:
        return [str(REPO / "recipes" / "hyperloop-991m.yaml"), f"parallel.nnodes={min(4, p.max_nodes)}",
                f"parallel.nproc_per_node={p.gpus_per_node}"]
    return [str(REPO / "recipes" / "tiny-cpu.yaml")]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_rendered_script_is_valid_bash_with_the_directives(profile: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "my runs" / "it's here"  # a space and a quote in the path
    assert main(["submit", *_recipe_for(profile), "--cluster", str(profile), "--dry-run",
                 "--run-dir", str(run_dir)]) == 0
    script = capsys.readouterr().out
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    p = load_profile(profile)
    cfg = load_config(*_split(_recipe_for(profile)))
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    expected = [f"--nodes={cfg.parallel.nnodes}", "--ntasks-per-node=1", f"--cpus-per-task={p.cpus_per_task}",
                f"--time={p.time}", "--requeue", f"--signal=B:USR1@{p.signal_grace_s}", "--open-mode=append",
                f'--output="{run_dir}/logs/slurm-%j.out"']
    expected += [f"--gpus-per-node={p.gpus_per_node}"] if p.gpus_per_node else []
    expected += [f"--{k}={getattr(p, k)}" for k in ("partition", "account", "qos", "mem") if getattr(p, k)]
    for item in expected:
        assert f"#SBATCH {item}" in directives, item
    assert not any("--gpus-per-node" in d for d in directives) or p.gpus_per_node
    assert f"RUN_DIR={shlex.quote(str(run_dir))}" in script
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"' in script
    assert f"--nproc-per-node={cfg.parallel.nproc_per_node}" in script
    assert 'scancel --signal=USR1 "$SLURM_JOB_ID.0"' in script and "trap on_usr1 USR1" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # A step the hang watchdog ended (it leaves hang/requeue) is requeued, a bounded number of times.
    assert '[ -f "$RUN_DIR/hang/requeue" ] && [ "${SLURM_RESTART_COUNT:-0}" -lt 3 ]' in script
    assert not (run_dir / "submit.sbatch").exists(), "--dry-run writes nothing"


def test_quoted_paths_reach_the_shell_intact(tmp_path: Path) -> None:
    """The shell sees RUN_DIR exactly, whatever spaces, quotes or $ it holds."""
    run_dir = tmp_path / "a b" / "c'd $HOME `x`"
    with pytest.raises(ConfigError, match="cannot quote"):  # $ and ` cannot go into an #SBATCH line
        prepare(load_config(None), load_profile("local"), "tiny-cpu", run_dir=run_dir)
    run_dir = tmp_path / "a b" / "c'd (e)"
    job = prepare(load_config(None), load_profile("local"), "tiny-cpu", run_dir=run_dir)
    lines = [line for line in job.script.splitlines() if line.startswith("RUN_DIR=")]
    out = subprocess.run(["bash", "-c", f'{lines[0]}\nprintf %s "$RUN_DIR"'], capture_output=True, text=True)
    assert out.stdout == str(run_dir)


def _split(items: list[str]) -> tuple[str, list[str]]:
    return items[0], items[1:]


@pytest.mark.parametrize("body, field", [
    ("gpus_per_node: -1\n", "gpus_per_node"),
    ("time: soon\n", "time"),
    ("partition: 'gpu; rm -rf /'\n", "partition"),
    ("cpus_per_task: 0\n", "cpus_per_task"),
    ("gpus: 8\n", "gpus"),  # unknown field, with a suggestion
    ("env: {'1BAD': x}\n", "env.1BAD"),
    ("setup: 'module load x'\n", "setup"),  # a string where a list is expected
    ("mem: lots\n", "mem"),
])
def test_invalid_profiles_are_rejected_naming_the_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\n" + body)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        load_profile(path)
    assert "bad.yaml" in str(err.value)


def test_layout_must_fit_the_profile(capsys) -> None:
    with pytest.raises(ConfigError, match="parallel.nproc_per_node=4"):
        prepare(load_config(None, ["parallel.nproc_per_node=4"]), load_profile("local"), "tiny-cpu")
    assert main(["submit", "--cluster", "local", "--dry-run", "parallel.nnodes=2"]) == 2
    assert "max_nodes" in capsys.readouterr().err
    assert main(["submit", "--cluster", "no-such-profile", "--dry-run"]) == 2
    assert "h100-8x" in capsys.readouterr().err  # the error lists the shipped profiles
