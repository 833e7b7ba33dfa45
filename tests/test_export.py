"""INT4 export: releases that transformers and compressed-tensors load exactly, and GPTQ against RTN."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hyperloop_dist.config import ConfigError, load_config
from hyperloop_dist.export import int4
from hyperloop_dist.export.compressed import WEIGHTS, load_int4_release, write_int4_release
from hyperloop_dist.export.quantize_release import (
    calibration_batches,
    heldout_windows,
    load_source,
    quantize_model,
    quantized_layer_bytes,
)
from hyperloop_dist.model.reference import ReferenceModel

from .conftest import FIXTURE_CORPUS
from .helpers import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

GROUP = 64  # divides the tiny model's widths (hidden 64, ffn 192)
TRAIN = ["model.hidden_size=64", "train.steps=200", "train.micro_batch_size=16", "optim.lr=5e-3",
         "optim.warmup_steps=10", "train.log_interval=50", "parallel.nproc_per_node=1", "data.loader=windows"]
SETTINGS = [f"export.group_size={GROUP}", "export.calibration_batches=8", "export.heldout_windows=200"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a busy 2-core machine: 10x faster than 2 contending threads
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hyperloop trained by `hyperloop train` (1 process, ~100k tokens): weights with structure to lose."""
    out = tmp_path_factory.mktemp("export") / "run"
    train([*tiny_data, *TRAIN], out)
    return out


@pytest.fixture(scope="module")
def source(run: Path, tiny_data: list[str]):
    model, cfg, _ = load_source(run, SETTINGS)
    return model, cfg


@pytest.fixture(scope="module")
def cfg(source):
    return source[1]


@pytest.fixture(scope="module")
def trained(source) -> ReferenceModel:
    return source[0]


@pytest.fixture(scope="module")
def gptq_release(cfg, trained, tmp_path_factory: pytest.TempPathFactory):
    e = dataclasses.replace(cfg.export, method="gptq")
    quantized = quantize_model(trained, e, calibration_batches(cfg), cfg.data.tokenizer)
    out = write_int4_release(trained, quantized, e, tmp_path_factory.mktemp("int4") / "release")
    return out, quantized


def test_int4_release_loads_through_transformers_and_compressed_tensors_exactly(cfg, trained, gptq_release) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    import hyperloop_dist.export.hf_model  # noqa: F401  (registers model_type "hyperloop")

    out, quantized = gptq_release
    fake = int4.apply_fake_quantized(copy.deepcopy(trained), quantized)
    reference = fake.state_dict()

    # compressed-tensors' own decompressor, driven by nothing but the files.
    qconfig = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    (scheme,) = qconfig.config_groups.values()
    with safe_open(str(out / WEIGHTS), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    packed = sorted(k.removesuffix(".weight_packed") for k in stored if k.endswith(".weight_packed"))
    assert packed == sorted(quantized.weights)
    assert any(name.startswith("middle.") for name in packed) and "middle.layers.0.mlp.linear_fc1.weight" not in stored
    for name in packed:
        module_state = {k.removeprefix(name + "."): v for k, v in stored.items() if k.startswith(name + ".")}
        assert stored[name + ".weight_packed"].dtype == torch.int32
        weight = PackedQuantizationCompressor.decompress(module_state, scheme)["weight"]
        assert torch.equal(weight.float(), reference[name + ".weight"]), name

    # transformers: the registered class, weights as stored (bf16) and logits in float32.
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert type(hf).__name__ == "HyperloopForCausalLM"
    tokens = heldout_windows(cfg, 4)[:, :-1]
    hf(tokens[:1])  # compressed-tensors decompresses on the first forward
    hf_state = hf.model.state_dict()
    for name, tensor in reference.items():
        assert torch.equal(hf_state[name].float(), tensor), name
    loaded = load_int4_release(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), fake(tokens), atol=1e-5, rtol=0)
        out_hf = hf(input_ids=tokens, labels=tokens)
    assert torch.isfinite(out_hf.loss)


def test_int4_weights_are_at_most_0_3x_bf16_for_quantized_layers(gptq_release) -> None:
    out, _ = gptq_release
    int4_bytes, bf16_bytes = quantized_layer_bytes(out / WEIGHTS)
    assert 0 < int4_bytes <= 0.3 * bf16_bytes, (int4_bytes, bf16_bytes)


def test_gptq_reconstructs_every_layers_outputs_better_than_rtn(cfg, trained, gptq_release) -> None:
    """GPTQ's objective, per Linear: ``||X W_q^T - X W^T||`` over the layer's calibration inputs (every loop
    pass of the shared middle block), smaller than RTN's. The held-out loss of this tiny model moves by
    noise-sized amounts (docs/export.md: the loss comparison needs a model where RTN costs 0.02 nats)."""
    gptq = gptq_release[1]
    rtn = quantize_model(trained, dataclasses.replace(cfg.export, method="rtn"))
    modules = {name: m for name, m in int4.target_modules(trained, cfg.export).items()}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs[name].append(args[0].detach()))
             for name, m in modules.items()]
    with torch.no_grad():
        for tokens in calibration_batches(cfg)[:2]:
            trained(tokens)
    for h in hooks:
        h.remove()
    for name, module in modules.items():
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs[name]])
        reference = x @ module.weight.detach().T
        error = {method: (x @ q.weights[name].T - reference).norm().item() for method, q in (("gptq", gptq), ("rtn", rtn))}
        assert error["gptq"] < error["rtn"], (name, error)


def test_gptq_hessian_gathers_every_loop_of_the_shared_middle_block(cfg, trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """llm-compressor's GPTQ (`--int4 method=gptq`, `--quantize W4A16`), calibrated with one whole forward per
    batch, feeds each Linear's Hessian every call: the shared middle block's get L times the begin block's rows."""
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    from hyperloop_dist.export.llm_compressor import quantize_in_memory, transformers_model

    rows: dict[str, int] = {}
    calibrate = GPTQModifier.calibrate_module

    def counting(self, module, args, output):
        name = self._module_names[module]
        rows[name] = rows.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).shape[0]
        return calibrate(self, module, args, output)

    monkeypatch.setattr(GPTQModifier, "calibrate_module", counting)
    batches = calibration_batches(cfg)[:2]
    quantize_in_memory(transformers_model(trained).to(torch.bfloat16), "W4A16", cfg.export, batches,
                       cfg.data.tokenizer)
    tokens = sum(b.numel() for b in batches)
    assert rows["model.begin.layers.0.mlp.linear_fc1"] == tokens
    assert rows["model.middle.layers.1.mlp.linear_fc1"] == cfg.model.loops * tokens
    assert rows["model.end.layers.0.self_attention.linear_qkv"] == tokens


def test_gguf_container_holds_q4_0_of_the_quantized_weights(trained, gptq_release, tmp_path: Path) -> None:
    from hyperloop_dist.export.gguf_container import read_gguf, write_gguf

    _, quantized = gptq_release
    tensors = read_gguf(write_gguf(trained, quantized, tmp_path / "model.gguf"))
    assert tensors.keys() == trained.state_dict().keys()  # the shared middle block once
    for name, weight in quantized.weights.items():
        kind, stored = tensors[f"{name}.weight"]
        assert kind == "Q4_0" and stored.shape == weight.shape
        # Q4_0 re-rounds onto its own grid: within one step (|block max| / 8) of our INT4 weights.
        step = weight.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True) / 8
        assert ((stored - weight).unflatten(-1, (-1, 32)).abs() <= step * 1.01 + 1e-6).all(), name
    kind, norm = tensors["final_norm.weight"]
    assert kind == "F32" and torch.equal(norm, trained.final_norm.weight.detach())


def test_bad_export_settings_name_the_field(cfg, trained) -> None:
    with pytest.raises(ConfigError, match="export.group_size=48: must divide the input width 64"):
        int4.target_modules(trained, dataclasses.replace(cfg.export, group_size=48))
    with pytest.raises(ConfigError, match="export.group_size=0: must be > 0"):
        load_config(None, ["export.group_size=0"])
    with pytest.raises(ConfigError, match="export.method='awq'"):
        load_config(None, ["export.method=awq"])
    with pytest.raises(ConfigError, match="export.quantize_head=true with model.tie_embeddings=true"):
        load_config(None, ["export.quantize_head=true"])


def test_cli_exports_int4_from_a_run_directory(run: Path, tiny_data: list[str], tmp_path: Path) -> None:
    """`hyperloop export --int4` on the run: table with both losses and sizes; refuses an INT4 source."""
    out = tmp_path / "int4"
    cmd = [sys.executable, "-m", "hyperloop_dist.cli", "export", "--int4", "method=gptq", f"group_size={GROUP}",
           "calibration_batches=2", "heldout_windows=8", str(run), str(out)]
    cmd.insert(4, "--format=gguf")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "held-out loss" in proc.stdout and f"INT4 gptq g{GROUP}" in proc.stdout and "bf16" in proc.stdout
    info = json.loads((out / "config.json").read_text())
    assert info["model_type"] == "hyperloop" and info["quantization_config"]["format"] == "pack-quantized"
    assert info["int4"]["method"] == "gptq" and (out / "tokenizer.model").is_file() and (out / "model.gguf").is_file()
    card = (out / "README.md").read_text()  # the model card: both losses and the gap
    gap = info["int4"]["heldout_loss"] - info["int4"]["bf16_heldout_loss"]
    assert f"(gap {gap:+.4f})" in card and "training steps / tokens | 200 /" in card and (out / "tokenizer.json").is_file()
    again = subprocess.run([*cmd[:-2], str(out), str(tmp_path / "again")], capture_output=True, text=True)
    assert again.returncode == 2 and "already a quantized release" in again.stderr

    # `hyperloop eval` on the INT4 release: its own held-out loss next to the bf16 figure and both sizes.
    results = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "eval", str(out), *tiny_data, "--windows", "8",
                           "--out", str(results)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "INT4 release" in proc.stdout and "bf16 weights would take" in proc.stdout
    assert f"bf16 {info['int4']['bf16_heldout_loss']:.4f} vs INT4" in proc.stdout
    assert json.loads(results.read_text())["heldout_loss"] == pytest.approx(info["int4"]["heldout_loss"], abs=1e-4)


def test_release_loads_through_transformers_with_reference_logits(release: Path, cfg) -> None:
    """`hyperloop export --release` (unchanged format, reference names) is also a transformers checkpoint."""
    from transformers import AutoModelForCausalLM

    from hyperloop_dist.export.release import load_release

    reference = load_release(release)
    hf = AutoModelForCausalLM.from_pretrained(str(release), dtype=torch.float32)
    assert type(hf).__module__ == "hyperloop_dist.export.hf_model"  # registered class wins without trust_remote_code
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in reference.parameters())
    tokens = heldout_windows(cfg, 2)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, reference(tokens), atol=1e-6, rtol=0)


def test_embedding_and_untied_head_quantize_when_asked(tmp_path: Path) -> None:
    from hyperloop_dist.config import ExportConfig, ModelConfig

    torch.manual_seed(0)
    model = ReferenceModel(ModelConfig(hidden_size=64, vocab_size=256, loops=2, tie_embeddings=False)).eval()
    e = ExportConfig(group_size=GROUP, quantize_embedding=True, quantize_head=True)
    quantized = quantize_model(model, e)
    assert {"embedding.word_embeddings", "output_layer"} <= set(quantized.weights)
    out = write_int4_release(model, quantized, e, tmp_path / "release")
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_int4_release(out)(tokens),
                                   int4.apply_fake_quantized(copy.deepcopy(model), quantized)(tokens), atol=1e-5, rtol=0)


# Run with hyperloop_dist (and the training stack) unimportable: what a downstream team has.
WITHOUT_PACKAGE = r"""
import sys
for name in ("hyperloop_dist", "data_pipeline", "megatron", "deepspeed", "lm_eval", "llmcompressor"):
    sys.modules[name] = None  # `import name` now raises ImportError
"""
STANDALONE = WITHOUT_PACKAGE + r"""
import json
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
release, int4, job, out = sys.argv[1:5]
job = json.loads(open(job).read())
tokens, prompt = torch.tensor(job["tokens"]), torch.tensor(job["prompt"])
result = {}

def greedy(model, use_cache):
    return model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=use_cache, pad_token_id=0)

with torch.no_grad():
    model = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True, dtype=torch.float32)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    result["logits"] = model(input_ids=tokens).logits
    result["cached"], result["uncached"] = greedy(model, True), greedy(model, False)
    model.config.num_loops_inference = 1
    result["logits_1_loop"] = model(input_ids=tokens).logits
    tokenizer = AutoTokenizer.from_pretrained(release, trust_remote_code=True)
    result["ids"] = [tokenizer(text)["input_ids"] for text in job["texts"]]
    result["decoded"] = [tokenizer.decode(ids) for ids in result["ids"]]
    q = AutoModelForCausalLM.from_pretrained(int4, trust_remote_code=True, dtype=torch.bfloat16)
    q(tokens[:1])  # compressed-tensors decompresses on the first forward
    result["int4_logits"] = q(input_ids=tokens).logits
    result["int4_cached"], result["int4_uncached"] = greedy(q, True), greedy(q, False)
torch.save(result, out)
"""
ALLOWED_IMPORTS = {"torch", "transformers", "safetensors", "__future__"}


@pytest.fixture(scope="module")
def release(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hyperloop_dist.export.release import export_release

    return export_release(run, tmp_path_factory.mktemp("release") / "release")


def test_releases_load_and_generate_with_transformers_alone(release: Path, cfg, gptq_release, tmp_path: Path) -> None:
    """The fp32 and INT4 releases, in a process where hyperloop_dist cannot be imported, with
    trust_remote_code: reference logits, today's INT4 logits, cached == uncached greedy tokens, the ids of
    our sentencepiece tokenizer."""
    import ast

    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    from hyperloop_dist.evaluation.loops import loop_logits, reference_parts
    from hyperloop_dist.export.release import load_release
    from hyperloop_dist.export.remote_code import AUTO_MAP, CONFIG_FILE, MODELING_FILE

    int4_dir = gptq_release[0]
    for path in (release, int4_dir):
        assert json.loads((path / "config.json").read_text())["auto_map"] == AUTO_MAP
        for name in (CONFIG_FILE, MODELING_FILE):
            imported = {(n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
                        for n in ast.walk(ast.parse((path / name).read_text())) if isinstance(n, ast.Import | ast.ImportFrom)
                        if not (isinstance(n, ast.ImportFrom) and n.level) for a in n.names}
            assert imported - sys.stdlib_module_names <= ALLOWED_IMPORTS, (name, imported)
    sp = spm.SentencePieceProcessor(model_file=str(release / "tokenizer.model"))
    texts = ["To be, or not to be: that is the question.", "  two  spaces\n\tand 1234 digits", " Ünïcödé ☃ 🤖 ",
             (FIXTURE_CORPUS / "tempest_gut.txt").read_text()[:4000]]
    tokens = heldout_windows(cfg, 2)[:, :-1]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"tokens": tokens.tolist(), "prompt": tokens[:, :8].tolist(), "texts": texts}))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(release), str(int4_dir), str(job), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")

    reference = load_release(release)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], reference(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(got["logits_1_loop"], loop_logits(reference_parts(reference), 1)(tokens),
                                   atol=1e-5, rtol=0)
        today = AutoModelForCausalLM.from_pretrained(str(int4_dir), dtype=torch.bfloat16)  # the in-package class
        today(tokens[:1])
        assert torch.equal(got["int4_logits"], today(input_ids=tokens).logits)
    assert torch.equal(got["cached"], got["uncached"]) and torch.equal(got["int4_cached"], got["int4_uncached"])
    assert got["ids"] == [sp.encode(t) for t in texts] and got["decoded"] == texts

    card = (release / "README.md").read_text()
    info = json.loads((release / "config.json").read_text())
    assert f"{info['training']['heldout_loss']:.4f}" in card and "trust_remote_code=True" in card
    assert f"{sum(p.numel() for p in reference.parameters()):,}" in card
    assert info["training"]["tokens"] == 200 * 16 * cfg.model.seq_length


# Held-out loss of each llm-compressor release, loaded by transformers + compressed-tensors alone.
QUANTIZED_LOSSES = WITHOUT_PACKAGE + r"""
import json
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
job = json.loads(open(sys.argv[1]).read())
windows, losses = torch.tensor(job["windows"]), {}
for scheme, path in job["releases"].items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits.float()
    losses[scheme] = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
print(json.dumps(losses))
"""
# Largest held-out loss gaps allowed against bf16 on the test's model (benchmarks/int4_compare.py and
# docs/export.md give the measured ones): INT4 weights, then 8-bit weights and activations.
GAP_BOUND = {"W4A16": 0.02, "W4A16-RTN": 0.02, "W4A16-AWQ": 0.02, "W8A8-INT8": 0.01, "W8A8-FP8": 0.01,
             "FP8-dynamic": 0.01}


def test_llm_compressor_schemes_export_and_load_with_transformers_alone(run: Path, cfg, tmp_path: Path) -> None:
    """Every `--quantize` scheme on the trained run: a compressed-tensors release whose held-out loss, loaded
    where hyperloop_dist and llm-compressor cannot be imported, is the one reported, within its bound."""
    from hyperloop_dist.cli import main
    from hyperloop_dist.export.llm_compressor import SCHEMES
    from hyperloop_dist.export.quantize_release import export_quantized

    settings = [f"export.group_size={GROUP}", "export.calibration_batches=2", "export.heldout_windows=16"]
    reports = {scheme: export_quantized(run, tmp_path / scheme, scheme, settings, log=lambda *_: None)
               for scheme in SCHEMES if scheme != "W4A16"}
    out = tmp_path / "W4A16"  # one through the CLI: the table it prints
    assert main(["export", "--quantize", "W4A16", *[s.removeprefix("export.") for s in settings], str(run), str(out)]) == 0
    info = json.loads((out / "config.json").read_text())
    assert info["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == GROUP
    assert info["quantized"]["scheme"] == "W4A16" and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    gap = info["quantized"]["heldout_loss"] - info["quantized"]["bf16_heldout_loss"]
    assert f"(gap {gap:+.4f})" in card and "llm-compressor" in card
    reported = {scheme: r.loss for scheme, r in reports.items()} | {"W4A16": info["quantized"]["heldout_loss"]}
    bf16 = info["quantized"]["bf16_heldout_loss"]
    assert all(r.bf16_loss == pytest.approx(bf16, abs=1e-6) for r in reports.values())

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"windows": heldout_windows(cfg, 16).tolist(),
                               "releases": {scheme: str(tmp_path / scheme) for scheme in SCHEMES}}))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", QUANTIZED_LOSSES, str(job)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    alone = json.loads(proc.stdout.strip().splitlines()[-1])
    for scheme in SCHEMES:
        assert alone[scheme] == pytest.approx(reported[scheme], abs=1e-4), scheme
        assert reported[scheme] - bf16 < GAP_BOUND[scheme], (scheme, reported[scheme], bf16)
    with pytest.raises(ConfigError, match="export.quantize_embedding=true: --quantize leaves the embedding"):
        export_quantized(run, tmp_path / "refused", "W4A16", ["export.quantize_embedding=true"])
    assert not (tmp_path / "refused").exists()
