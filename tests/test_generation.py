"""Generation from a release's transformers class: the loop-aware cache, loops at inference, early exit.

Random models of every kind (no training: the checks are exact equalities, not quality); the release files
themselves, loaded without this package, are tests/test_export.py's.
"""

from __future__ import annotations

import pytest
import torch

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.evaluation.loops import loop_logits, reference_parts
from hyperloop_dist.export.hf_model import HyperloopForCausalLM, hf_config
from hyperloop_dist.export.loop_cache import LoopKVCache
from hyperloop_dist.model.hyper_connections import KINDS

# init_std 0.2: peaked logits, so a greedy choice is never a near-tie that float rounding could flip.
SMALL = {"hidden_size": 64, "vocab_size": 256, "loops": 3, "init_std": 0.2, "num_query_groups": 2}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: contending threads cost 10x
    yield
    torch.set_num_threads(threads)


def model(kind: str) -> HyperloopForCausalLM:
    torch.manual_seed(0)
    return HyperloopForCausalLM(hf_config(ModelConfig(kind=kind, **SMALL))).eval().requires_grad_(False)


def greedy(hf: HyperloopForCausalLM, prompt: torch.Tensor, use_cache: bool, new: int = 12) -> torch.Tensor:
    return hf.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_uncached_for_every_kind(kind: str) -> None:
    hf = model(kind)
    prompt = torch.randint(0, 256, (2, 7))
    # Prefill in two chunks then one token: the cached logits are the full forward's.
    cache = hf.new_cache()
    full = hf(prompt).logits
    parts = [hf(chunk, past_key_values=cache, use_cache=True).logits for chunk in (prompt[:, :4], prompt[:, 4:6],
                                                                                  prompt[:, 6:])]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)
    b, m, passes, e = hf.model.cache_layout()
    assert len(cache) == b + m * passes + e and cache.get_seq_length() == 7
    if kind in ("hyperloop", "looped"):
        assert passes == 3 and cache.names()[b + m] == "middle.0@pass1"
    assert torch.equal(greedy(hf, prompt, True), greedy(hf, prompt, False))


@pytest.mark.parametrize("kind", ["hyperloop", "looped"])
def test_fewer_loops_read_out_as_eval_loops_and_generate_the_same_with_the_cache(kind: str) -> None:
    hf = model(kind)
    prompt = torch.randint(0, 256, (1, 9))
    for k in (1, 2):
        hf.config.num_loops_inference = k
        torch.testing.assert_close(hf(prompt).logits, loop_logits(reference_parts(hf.model), k)(prompt),
                                   atol=0, rtol=0)
        assert hf.new_cache().passes == k
        assert torch.equal(greedy(hf, prompt, True), greedy(hf, prompt, False))


def test_confidence_exit_skips_loops_and_keeps_the_cache_consistent() -> None:
    hf = model("hyperloop")
    prompt = torch.randint(0, 256, (1, 5))
    exact = greedy(hf, prompt, True)
    hf.config.exit_threshold = 1.0  # never reached: the same tokens as without exit
    assert torch.equal(greedy(hf, prompt, True), exact)
    hf.config.exit_threshold = 1e-6  # always reached: every decoded token stops after one loop
    cache = hf.new_cache()
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, past_key_values=cache, pad_token_id=0)
    lengths = {cache.layers[i].get_seq_length() for i in range(len(cache))}
    assert lengths == {5 + 6 - 1}, lengths  # every entry, skipped passes included, holds every position
    first = cache.middle_slot(0)
    torch.testing.assert_close(cache.layers[cache.middle_slot(2)].keys[..., 5:, :], cache.layers[first].keys[..., 5:, :])
    assert out.shape == (1, 11)


def test_bad_inference_settings_name_the_field() -> None:
    hf = model("transformer")
    hf.config.num_loops_inference = 2
    with pytest.raises(ValueError, match="num_loops_inference=2: a transformer model unrolls"):
        hf(torch.zeros(1, 2, dtype=torch.long))
    hf = model("hyperloop")
    hf.config.num_loops_inference = 4
    with pytest.raises(ValueError, match="num_loops_inference=4: must be between 1 and the trained loops 3"):
        hf.new_cache()
    hf.config.num_loops_inference, hf.config.exit_threshold = None, 1.5
    with pytest.raises(ValueError, match=r"exit_threshold=1.5: a probability in \(0, 1\]"):
        hf(torch.zeros(1, 2, dtype=torch.long))
    hf.config.exit_threshold = None
    with pytest.raises(ValueError, match="padding"):
        hf(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.tensor([[0, 1]]))
    assert isinstance(hf(torch.zeros(1, 2, dtype=torch.long), use_cache=True).past_key_values, LoopKVCache)


def test_release_code_is_generated_from_the_package_modules_and_refuses_what_it_cannot_ship() -> None:
    """The shipped files hold each module's own text; a name the files would not define stops the export."""
    import inspect

    from hyperloop_dist.export import remote_code
    from hyperloop_dist.model import reference

    files = remote_code.model_code()
    modeling = files[remote_code.MODELING_FILE]
    body = inspect.getsource(reference.ReferenceModel)
    assert body in modeling and inspect.getsource(HyperloopForCausalLM) in modeling
    assert "import hyperloop_dist" not in modeling and "from hyperloop_dist" not in modeling
    assert "def register" not in modeling  # the package's own registration is not shipped
    compile(files[remote_code.CONFIG_FILE], remote_code.CONFIG_FILE, "exec")
    with pytest.raises(ValueError, match="imports .* from hyperloop_dist, which the release's model code does not"):
        remote_code._assemble([(p, remote_code._section(p)) for p in remote_code.MODELING_PIECES[2:]], "t", set())
