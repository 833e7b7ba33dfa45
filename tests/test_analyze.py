"""``hyperloop analyze``: the paper's section 4.4 analyses (cross-loop similarity, residual-stream cosine
heatmap, logit lens) on tiny in-process models of every kind, and the command end to end on a trained
hyperloop run compared with a looped release."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hyperloop_dist.config import load_config
from hyperloop_dist.evaluation.analysis import FIGURE_HEATMAP, FIGURE_LENS, RESULTS, analyze_model
from hyperloop_dist.evaluation.heldout import reference_heldout_loss
from hyperloop_dist.evaluation.loops import loop_nll, reference_parts
from hyperloop_dist.model.hyper_connections import LOOPED_KINDS
from hyperloop_dist.model.reference import ReferenceModel

from .conftest import TINY_MODEL

WINDOWS = torch.randint(0, 512, (5, 33), generator=torch.Generator().manual_seed(1))  # 5 x 32 tokens


def tiny(kind: str, *extra: str, perturb: float = 0.3) -> ReferenceModel:
    """A tiny model (1/2x2/1, d 32); the HC gates and loop embeddings are moved off their identity-like init
    so the early merge and the loop embedding take part."""
    cfg = load_config(None, [*TINY_MODEL, f"model.kind={kind}", *extra]).model
    torch.manual_seed(0)
    model = ReferenceModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("hc.") or name == "loop_embedding":
                p.add_(perturb * torch.randn_like(p))
    return model.eval()


CASES = [("looped", ()), ("hyperloop", ()), ("hyperloop", ("model.hc.res=sinkhorn",)),
         ("hyperloop", ("model.hc.per_loop_params=false", "model.tie_embeddings=false")),
         ("transformer", ()), ("mhc", ())]


@pytest.mark.parametrize(("kind", "extra"), CASES, ids=[" ".join((k, *e)) for k, e in CASES])
def test_tables_span_the_effective_depth_and_the_lens_ends_at_the_model_loss(kind: str, extra: tuple) -> None:
    model = tiny(kind, *extra)
    a = analyze_model(model, WINDOWS, batch_size=2)
    depth = model.cfg.effective_depth
    assert depth == 6 and len(a.layers) == depth and a.tokens == 5 * 32
    cos = torch.tensor(a.cosine, dtype=torch.float64)
    assert cos.shape == (depth, depth)
    torch.testing.assert_close(cos.diagonal(), torch.ones(depth, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cos, cos.T, atol=1e-6, rtol=0)  # (float32 matmul sums)
    assert (cos <= 1 + 1e-6).all() and (cos >= -1 - 1e-6).all()
    for key in ("cross_entropy", "entropy", "accuracy"):
        assert len(getattr(a, key)) == depth
    # The last effective layer's stream is what the model's own norm + head read.
    assert a.cross_entropy[-1] == pytest.approx(reference_heldout_loss(model, WINDOWS), abs=1e-5)
    with torch.no_grad():
        own = (model(WINDOWS[:, :-1]).argmax(-1) == WINDOWS[:, 1:]).double().mean().item()
    assert a.accuracy[-1] == pytest.approx(own, abs=1e-9)
    if kind in LOOPED_KINDS:
        assert a.layers == ["B0", "L0.M0", "L0.M1", "L1.M0", "L1.M1", "E0"] and a.loop_ends == [2, 4]
        assert len(a.middle_cosine) == 2 and a.middle_cosine_mean == pytest.approx(sum(a.middle_cosine) / 2)
        assert all(-1 <= c <= 1 for c in a.middle_cosine)
    else:
        assert a.middle_cosine is None and a.loop_ends == []
    json.loads(json.dumps(dataclasses.asdict(a)))


@pytest.mark.parametrize("kind", LOOPED_KINDS)
def test_the_lens_at_each_loop_end_is_the_model_stopped_after_that_loop(kind: str) -> None:
    """Without an end block, the lens at loop l's end reads the state the model hands on after loop l: the
    per-loop readout of ``hyperloop eval`` (loops.py) computes the same through loop_boundary."""
    model = tiny(kind, "model.end_layers=0", "model.loops=3")
    a = analyze_model(model, WINDOWS, batch_size=5)
    with torch.no_grad():
        curve = loop_nll(reference_parts(model))(WINDOWS[:, :-1], WINDOWS[:, 1:]).mean(dim=(1, 2))
    assert a.loop_ends == [2, 4, 6]
    for k, end in enumerate(a.loop_ends):
        assert a.cross_entropy[end] == pytest.approx(float(curve[k]), abs=1e-5)


@pytest.mark.parametrize("kind", LOOPED_KINDS)
def test_a_middle_block_that_passes_its_input_through_is_the_same_in_every_loop(kind: str) -> None:
    """Zeroed output projections make every middle layer the identity: with no loop embedding, each loop's
    layer outputs are positive multiples of the begin block's output, so Table 8's cosine is 1."""
    model = tiny(kind, "model.loop_embedding=false")
    with torch.no_grad():
        for layer in model.middle.layers:
            layer.self_attention.linear_proj.weight.zero_()
            layer.mlp.linear_fc2.weight.zero_()
    a = analyze_model(model, WINDOWS)
    assert a.middle_cosine == pytest.approx([1.0, 1.0], abs=1e-5)
    # ...and the residual stream stays parallel to the begin block's output until the end block.
    cos = torch.tensor(a.cosine, dtype=torch.float64)
    torch.testing.assert_close(cos[:5, :5], torch.ones(5, 5, dtype=torch.float64), atol=1e-5, rtol=0)


def write_release(model: ReferenceModel, out: Path, tokenizer: Path) -> Path:
    """A release of an in-process model, in the layout ``hyperloop export --release`` writes."""
    from hyperloop_dist.export.release import RELEASE_FORMAT

    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"format": RELEASE_FORMAT,
                                                 "model": dataclasses.asdict(model.cfg)}))
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


@pytest.mark.slow
def test_analyze_command_compares_a_hyperloop_run_with_a_looped_release(
        single_run: tuple[Path, str], tiny_data: list[str], tmp_path: Path) -> None:
    run, _ = single_run
    tokenizer = Path(next(o for o in tiny_data if o.startswith("data.tokenizer=")).split("=", 1)[1])
    looped = write_release(tiny("looped", *tiny_data), tmp_path / "looped", tokenizer)
    out = tmp_path / "analysis"
    proc = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "analyze", str(run),
                           "--compare", str(looped), *tiny_data, "--windows", "6", "--batch-size", "4",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Table 8" in proc.stdout and "Figure 4" in proc.stdout
    assert "different token windows" not in proc.stdout  # same data and tokenizer: the same windows
    runs = json.loads((out / RESULTS).read_text())["runs"]
    assert [r["kind"] for r in runs] == ["hyperloop", "looped"]
    assert runs[0]["windows_sha256"] == runs[1]["windows_sha256"] and runs[0]["tokens"] == 6 * 32
    assert all(len(r["cosine"]) == len(r["layers"]) == 6 for r in runs)
    import matplotlib.image

    for png in (FIGURE_HEATMAP, FIGURE_LENS):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # The run's own held-out loss, as `hyperloop eval` reports it on the same windows.
    from hyperloop_dist.evaluation.offline import evaluate_checkpoint

    own = evaluate_checkpoint(run, tiny_data, windows=6).heldout_loss
    assert runs[0]["loss"] == pytest.approx(own, abs=1e-5)
