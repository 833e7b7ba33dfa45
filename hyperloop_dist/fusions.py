"""Torch-only fusions that megatron-core 0.16 allows without Apex or Transformer Engine (``train.fusions``).

``adamw``: :func:`use_fused_adamw`; ``grad_norm``: :func:`use_foreach_grad_norm`; ``rope``:
:func:`use_rope_tables`; ``swiglu`` is a TransformerConfig flag (``model/hyperloop.py``). Each is the same
training as without it (tests/test_fusions.py); the patches of Megatron's modules are process-wide and set
by :func:`apply_process_fusions` when the engine is built.

Without either, ``megatron.core.optimizer`` builds ``torch.optim.AdamW`` with ``fused`` left unset, so torch
picks its multi-tensor ``foreach`` path: several kernels per parameter group and step. torch's fused AdamW
does the whole update in one kernel per group and device. The flag is read from each parameter group at
every step, so it can be switched on from outside after Megatron built the optimizer, without copying any
of Megatron's construction code.
"""

from __future__ import annotations

import weakref

import torch

from hyperloop_dist.train.engines.base import torch_optimizers


def use_fused_adamw(optimizer: object) -> int:
    """Switch every torch Adam/AdamW inside ``optimizer`` to ``fused=True``; returns the groups switched.

    Call it before the first step: a fused step keeps its step counter on the parameter's device, while an
    unfused one already taken keeps it on the host.
    """
    switched = 0
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        if any(opt.state.get(p) for group in opt.param_groups for p in group["params"]):
            raise RuntimeError("use_fused_adamw: the optimizer has already stepped; switch before the first step")
        for group in opt.param_groups:
            if group.get("differentiable"):
                raise RuntimeError("use_fused_adamw: a differentiable optimizer cannot be fused")
            group["foreach"], group["fused"] = False, True
            switched += 1
    return switched


# ------------------------------------------------------------------ gradient norm and clip


def _foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                     per_tensor: bool, *args: object) -> tuple[torch.Tensor, None]:
    """Drop-in for ``amp_C.multi_tensor_l2norm`` that stays on the device: one ``_foreach_norm`` and a
    stack. Megatron's local fallback builds ``torch.tensor`` from a Python list of per-parameter device
    scalars, a host sync per parameter."""
    norms = [n for tensors in tensor_lists if tensors for n in torch._foreach_norm(tensors, 2.0)]
    if not norms:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                   scale: float) -> None:
    """Drop-in for ``amp_C.multi_tensor_scale`` (``dst = src * scale``) in one multi-tensor op."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_grad_norm(enabled: bool = True) -> bool:
    """Route megatron-core 0.16's gradient norm and clip through ``torch._foreach_*`` (or back).

    ``clip_grads.get_grad_norm_fp32`` and ``clip_grad_by_total_norm_fp32`` look up ``l2_norm_impl`` and
    ``multi_tensor_scale_impl`` in their module at every call; without Apex or Transformer Engine those are
    Megatron's per-parameter Python loops (``megatron.core.utils.local_multi_tensor_*``). Only those local
    fallbacks are replaced: with Apex or TE the names hold their fused kernels and nothing changes.
    Returns whether the foreach versions are in place. What remains is one host sync per step (the norm's
    ``.item()`` that Megatron returns as a float).
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    local = {"l2_norm_impl": utils.local_multi_tensor_l2_norm, "multi_tensor_scale_impl": utils.local_multi_tensor_scale}
    ours = {"l2_norm_impl": _foreach_l2_norm, "multi_tensor_scale_impl": _foreach_scale}
    current = {name: getattr(clip_grads, name) for name in local}
    if any(current[name] not in (local[name], ours[name]) for name in local):
        return False  # Apex / TE kernels: already fused
    for name in local:
        setattr(clip_grads, name, ours[name] if enabled else local[name])
    return enabled


# ------------------------------------------------------------------ RoPE


class _RopeTables:
    """cos / sin of one rotary-frequency tensor, kept while that tensor lives.

    Megatron's ``RotaryEmbedding.forward`` is an ``lru_cache``: one ``freqs`` tensor per sequence length.
    Its ``_apply_rotary_pos_emb_bshd`` still takes cos and sin of it on every call, twice (q and k) per
    layer and loop pass.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[weakref.ref, int, torch.Tensor, torch.Tensor]] = {}

    def get(self, freqs: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(freqs), mscale, dtype)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is freqs and hit[1] == freqs._version:
            return hit[2], hit[3]
        if len(self.entries) > 64:
            self.entries = {k: v for k, v in self.entries.items() if v[0]() is not None}
        with torch.no_grad():
            cos, sin = ((f(freqs) * mscale).to(dtype) for f in (torch.cos, torch.sin))
        self.entries[key] = (weakref.ref(freqs), freqs._version, cos, sin)
        return cos, sin


_ROPE_TABLES = _RopeTables()


def _rope_bshd_cached(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
                      multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
    """megatron-core 0.16.1's ``rope_utils._apply_rotary_pos_emb_bshd`` with cos / sin from :class:`_RopeTables`."""
    from megatron.core.models.common.embeddings import rope_utils

    if freqs.requires_grad:
        return _ROPE_ORIGINAL(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
    rot_dim = freqs.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    if multi_latent_attention:
        t = torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)
    cos, sin = _ROPE_TABLES.get(freqs, mscale, t.dtype)
    t = (t * cos) + (rope_utils._rotate_half(t, rotary_interleaved) * sin)
    return torch.cat((t, t_pass), dim=-1)


_ROPE_ORIGINAL = None


def use_rope_tables(enabled: bool = True) -> None:
    """RoPE's cos / sin once per sequence length (and dtype) instead of per attention call (or back)."""
    global _ROPE_ORIGINAL
    from megatron.core.models.common.embeddings import rope_utils

    if _ROPE_ORIGINAL is None:
        _ROPE_ORIGINAL = rope_utils._apply_rotary_pos_emb_bshd
    rope_utils._apply_rotary_pos_emb_bshd = _rope_bshd_cached if enabled else _ROPE_ORIGINAL


def apply_process_fusions(fusions: list[str]) -> None:
    """Switch this process's Megatron patches to ``train.fusions`` (the optimizer's own: :func:`use_fused_adamw`;
    swiglu: ``model.hyperloop.transformer_config``)."""
    use_foreach_grad_norm("grad_norm" in fusions)
    use_rope_tables("rope" in fusions)
