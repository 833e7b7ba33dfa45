"""The Hyperloop math: hyper-connections and the begin / looped middle / end topology.

Plain PyTorch, no Megatron: both the Megatron model (``hyperloop.py``) and its plain twin
(``reference.py``) run their blocks through :func:`run_body`, so the four model kinds differ only here.
docs/model.md gives the equations with the paper's numbers.

Residual state ``Y`` has shape ``[s, b, n, d]`` (n streams of width d, Megatron's sequence-first layout).
One hyper-connection wraps a function ``F``::

    z      = RMSNorm(flatten(Y))                          # [s, b, n*d], no learned scale
    H_pre  = sigmoid(a_pre  * z W_pre  + b_pre)            # [s, b, n]   read weights
    H_post = 2 sigmoid(a_post * z W_post + b_post)         # [s, b, n]   write weights
    H_res  = diag(sigmoid(a_res * z W_res + b_res))        # hc.res=diagonal (the Hyperloop's; W_res n x nd)
           | Sinkhorn(a_res * z W_res + b_res)             # hc.res=sinkhorn (mHC's; W_res n^2 x nd)
           | I                                             # hc.res=identity (no parameters)
    x      = H_pre . Y                                     # [s, b, d]   F's input
    Y'     = H_res Y + H_post (F(x) + e)                   # e: the loop position embedding, if any

For ``hyperloop`` F is the whole middle block, written back as it comes out (its layers keep their own
skip connections), once per loop, with each loop's own parameters and e_l. For ``mhc`` F is one attention
or MLP sub-layer's branch (``attn(norm(x))``, ``mlp(norm(x))``), two hyper-connections per layer, with no
skip of its own: the residual path is ``H_res``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

Block = Callable[[torch.Tensor], torch.Tensor]

KINDS = ("transformer", "mhc", "looped", "hyperloop")
LOOPED_KINDS = ("looped", "hyperloop")
HC_KINDS = ("hyperloop", "mhc")  # widened residual stream (ModelConfig.has_hc)
HC_RES_MODES = ("diagonal", "sinkhorn", "identity")


_LOG_FLOOR = -60.0  # exp(-60) ~ 1e-26: entries this far below their row's largest are treated as zero


def _tokens_last(x: torch.Tensor) -> torch.Tensor:
    """``[..., n, n] -> [n, n, T]``: the per-token reductions then run along contiguous memory."""
    n = x.shape[-1]
    return x.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _normalize(p: torch.Tensor, iters: int):
    """Sinkhorn-Knopp on ``p [n, n, T]``: yields each half-step's result and divisor (rows, then columns)."""
    for _ in range(iters):
        for dim in (1, 0):
            total = p.sum(dim, keepdim=True)
            p = p / total
            yield p, total, dim


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn with a hand-written backward of the same unrolled iterations.

    Autograd over 2 x ``iters`` normalizations of ``[tokens, n, n]`` records hundreds of tiny ops per
    hyper-connection, which made Sinkhorn most of the HC's cost. Here the forward keeps nothing but the
    shifted logits, and the backward recomputes the iterates and runs their exact chain rule in place: the
    gradient is the unrolled one (equal to float rounding), not an implicit fixed-point approximation.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        x = _tokens_last(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        shifted = x - x.amax(dim=1, keepdim=True)  # Sinkhorn ignores per-row constants
        p = shifted.clamp_min(_LOG_FLOOR).exp()
        for p_next, _, _ in _normalize(p, iters):
            p = p_next
        ctx.save_for_backward(shifted)
        ctx.iters, ctx.shape = iters, logits.shape
        return p.permute(2, 0, 1).contiguous().view(logits.shape).to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (shifted,) = ctx.saved_tensors
        p0 = shifted.clamp_min(_LOG_FLOOR).exp()
        g = _tokens_last(grad.to(shifted.dtype))
        for q, total, dim in reversed(list(_normalize(p0, ctx.iters))):
            g = (g - (g * q).sum(dim, keepdim=True)) / total
        g = g * p0 * (shifted > _LOG_FLOOR)
        return g.permute(2, 0, 1).contiguous().view(ctx.shape).to(grad.dtype), None


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Project ``[..., n, n]`` logits to doubly stochastic matrices (Sinkhorn-Knopp on ``exp(logits)``).

    Alternately normalizes rows and columns, computed in at least fp32; the last step normalizes columns,
    so columns sum to 1 exactly and rows to within the iteration's convergence. Convergence is linear with
    a rate set by the matrix: logits spread by ~0.1 reach 1e-6 in 20 iterations (mHC's count), N(0, 1)
    logits need ~50 for 1e-5, and near-permutations (spread >= 3) stay off by ~1e-2 even after hundreds.
    Logits more than 60 below their row's largest count as zero (and get no gradient).
    """
    return _Sinkhorn.apply(logits, iters)


class _StreamMix(torch.autograd.Function):
    """``H . S`` per token (``[..., n, n] @ [..., n, d]``), with a backward on contiguous operands.

    Autograd's own backward multiplies by transposed views, which sends CPU batched matmul down a loop
    over the tokens (select + clone per token): it was the largest part of a hyper-connection's time.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, streams)
        return torch.matmul(h, streams)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h, streams = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h = torch.matmul(grad, streams.transpose(-1, -2).contiguous()) if ctx.needs_input_grad[0] else None
        grad_s = torch.matmul(h.transpose(-1, -2).contiguous(), grad) if ctx.needs_input_grad[1] else None
        return grad_h, grad_s


def mix_streams(h: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """``[..., m, n] @ [..., n, d]`` per token: ``H_res . S`` (and any per-token stream mixing)."""
    return _StreamMix.apply(h, streams)


def sinkhorn_unrolled(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`sinkhorn` as plain ops, left to autograd: what ``torch.compile`` traces and fuses (the same
    iterations, floor and fp32 compute, so the same values and gradients to float rounding)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = (x - x.amax(dim=-1, keepdim=True)).clamp_min(_LOG_FLOOR).exp()
    for _ in range(iters):
        p = p / p.sum(-1, keepdim=True)  # rows
        p = p / p.sum(-2, keepdim=True)  # then columns
    return p.to(logits.dtype)


def hc_gates(streams: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, bias_pre: torch.Tensor,
             bias_post: torch.Tensor, bias_res: torch.Tensor | None, *, res: str, iters: int, eps: float,
             sinkhorn_fn: Callable[[torch.Tensor, int], torch.Tensor] = sinkhorn_unrolled,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:meth:`HyperConnection.gates` as a pure function of the state and the HC's parameters."""
    # The gates are computed in fp32 whatever the activation dtype: 20 Sinkhorn iterations in bf16 leave
    # row / column sums off by ~1e-2, and the gates are tiny next to the block's matmuls.
    n, dtype = streams.shape[-2], streams.dtype
    flat = streams.flatten(-2).float()
    z = nn.functional.rms_norm(flat, (flat.shape[-1],), eps=eps)
    raw = nn.functional.linear(z, weight.float())
    raw_pre, raw_post, raw_res = raw.split((n, n, raw.shape[-1] - 2 * n), dim=-1)
    alpha = alpha.float()
    h_pre = torch.sigmoid(alpha[0] * raw_pre + bias_pre.float())
    h_post = 2.0 * torch.sigmoid(alpha[1] * raw_post + bias_post.float())
    if res == "identity":
        return h_pre.to(dtype), h_post.to(dtype), None
    if res == "diagonal":
        h_res = torch.sigmoid(alpha[2] * raw_res + bias_res.float())
    else:
        h_res = sinkhorn_fn(alpha[2] * raw_res.unflatten(-1, (n, n)) + bias_res.float(), iters)
    return h_pre.to(dtype), h_post.to(dtype), h_res.to(dtype)


def hc_read(streams: torch.Tensor, *params: torch.Tensor | None, res: str, iters: int, eps: float,
            sinkhorn_fn: Callable[[torch.Tensor, int], torch.Tensor] = sinkhorn_unrolled,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:meth:`HyperConnection.read` as a pure function (``params``: weight, alpha, bias_pre/post/res)."""
    h_pre, h_post, h_res = hc_gates(streams, *params, res=res, iters=iters, eps=eps, sinkhorn_fn=sinkhorn_fn)
    # A weighted sum over the small stream dim: einsum would run it as [tokens] 1 x n matmuls (4x slower on CPU).
    return (h_pre.unsqueeze(-1) * streams).sum(-2), h_post, h_res


_COMPILED: dict[str, Callable] = {}


def compiled_hc(part: str) -> Callable:
    """The hyper-connection's ``read`` or ``write`` as one ``torch.compile(fullgraph=True)`` graph.

    Pure functions of tensors: the parameters come in as arguments, so every loop's HC (and every mHC
    sub-layer's) runs the same graph, and no loop index enters it (the loop embedding is indexed outside).
    Built on first use: ``hyperloop_dist/__init__.py`` swaps ``torch.compile`` for a no-op only while
    ``megatron.core`` imports on CPU machines, and is never active here.
    """
    if part not in _COMPILED:
        if torch.compile.__module__ != "torch":
            raise RuntimeError(f"model.compile: torch.compile is replaced by {torch.compile.__module__}")
        fn = hc_read if part == "read" else functools.partial(HyperConnection.write, mix=torch.matmul)
        _COMPILED[part] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[part]


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[s, b, d] -> [s, b, n, d]``: every stream starts as a copy of the input."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def collapse_streams(streams: torch.Tensor) -> torch.Tensor:
    """``[s, b, n, d] -> [s, b, d]``: the mean of the streams (equals the input when streams are equal)."""
    return streams.mean(dim=-2)


class HyperConnection(nn.Module):
    """One dynamic hyper-connection over ``n`` streams of width ``d``; ``res`` picks the H_res form.

    Initialization (the paper gives none; docs/model.md has the reasons): ``H_pre`` reads the stream mean
    (b_pre = logit(1/n)), ``H_post`` writes 1 to every stream (b_post = 0), the data-dependent parts start
    small (W ~ N(0, 0.02), every a = ``alpha_init``). ``diagonal``: b_res = 0, each stream keeps half of
    itself (the sigmoid's steepest point, so the gate learns fastest either way). ``sinkhorn``: b_res = I,
    a mild diagonal preference (a near-permutation would make Sinkhorn converge slowly).
    """

    def __init__(self, hidden_size: int, streams: int, res: str = "diagonal", sinkhorn_iters: int = 20,
                 alpha_init: float = 0.01, eps: float = 1e-6) -> None:
        super().__init__()
        if res not in HC_RES_MODES:
            raise ValueError(f"hyper-connection res={res!r}: one of {', '.join(HC_RES_MODES)}")
        n, d = streams, hidden_size
        self.streams, self.res, self.sinkhorn_iters = n, res, sinkhorn_iters
        self.compiled = False  # model.compile=hc: read and write run as compiled pure functions
        self.res_width = {"diagonal": n, "sinkhorn": n * n, "identity": 0}[res]
        self.norm = nn.RMSNorm(n * d, eps=eps, elementwise_affine=False)
        # W_pre | W_post | W_res fused into one projection: [(n*d) -> n + n + res_width].
        self.proj = nn.Linear(n * d, 2 * n + self.res_width, bias=False)
        self.alpha = nn.Parameter(torch.full((2 if res == "identity" else 3,), float(alpha_init)))
        read = min(1.0 / n, 1.0 - 1e-7)  # sigmoid can't reach 1; 1 - 1e-7 rounds to 1 in float32
        self.bias_pre = nn.Parameter(torch.full((n,), math.log(read / (1.0 - read))))
        self.bias_post = nn.Parameter(torch.zeros(n))  # 2 * sigmoid(0) = 1
        if res == "diagonal":
            self.bias_res = nn.Parameter(torch.zeros(n))
        elif res == "sinkhorn":
            self.bias_res = nn.Parameter(torch.eye(n))
        nn.init.normal_(self.proj.weight, std=0.02)

    def gates(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``H_pre [.., n]``, ``H_post [.., n]`` and ``H_res``: ``[.., n]`` (the diagonal), ``[.., n, n]``
        (Sinkhorn) or None (identity), for residual state ``[.., n, d]``."""
        return hc_gates(streams, *self._params(), **self._consts(), sinkhorn_fn=sinkhorn)

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """F's input ``x = H_pre . Y`` and the gates the write will need."""
        if self.compiled:
            return compiled_hc("read")(streams, *self._params(), **self._consts())
        return hc_read(streams, *self._params(), **self._consts(), sinkhorn_fn=sinkhorn)

    def write_back(self, streams: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor | None,
                   out_bias: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`write`, compiled when this hyper-connection is (``model.compile``)."""
        if self.compiled:
            return compiled_hc("write")(streams, y, h_post, h_res, out_bias)
        return self.write(streams, y, h_post, h_res, out_bias)

    def _params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.proj.weight, self.alpha, self.bias_pre, self.bias_post, getattr(self, "bias_res", None)

    def _consts(self) -> dict[str, object]:
        return {"res": self.res, "iters": self.sinkhorn_iters, "eps": self.norm.eps}

    @staticmethod
    def write(streams: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor | None,
              out_bias: torch.Tensor | None = None, mix: Callable | None = None) -> torch.Tensor:
        """``Y' = H_res Y + H_post (y [+ e])`` for F's output ``y``; H_res as :meth:`gates` returns it."""
        if out_bias is not None:
            y = y + out_bias
        if h_res is None:
            carried = streams
        elif h_res.dim() == streams.dim() - 1:  # the diagonal: one gate per stream
            carried = h_res.unsqueeze(-1) * streams
        else:
            carried = (mix or mix_streams)(h_res, streams)
        return carried + h_post.unsqueeze(-1) * y.unsqueeze(-2)

    def forward(self, streams: torch.Tensor, block: Block, out_bias: torch.Tensor | None = None) -> torch.Tensor:
        x, h_post, h_res = self.read(streams)
        return self.write_back(streams, block(x), h_post, h_res, out_bias)


Carry = tuple[torch.Tensor, ...] | None


def num_hyper_connections(kind: str, loops: int, depth: int, per_loop_params: bool) -> int:
    """How many distinct HyperConnection modules a kind owns (0 for the kinds without HC)."""
    if kind == "mhc":
        return 2 * depth  # one around each attention and each MLP sub-layer
    if kind == "hyperloop":
        return loops if per_loop_params else 1
    return 0


def num_passes(kind: str, loops: int) -> int:
    """How often the middle block runs: L times for the looped kinds, once (unrolled) otherwise."""
    return loops if kind in LOOPED_KINDS else 1


def loop_boundary(kind: str, loop: int, passes: int, carry: Carry, y: torch.Tensor, hcs: Sequence[HyperConnection],
                  loop_embedding: torch.Tensor | None, streams: int) -> tuple[Carry, torch.Tensor]:
    """What happens before pass ``loop`` of the middle block (and, at ``loop == passes``, after the last).

    ``y`` is what arrives at the boundary: the begin block's output before pass 0, the middle block's output
    after. Returns the state to carry to the next boundary and the next middle-block input (after the last
    pass: the collapsed output that goes to the end block). The single-process forward (:func:`run_body`)
    and the circular pipeline (``parallel/pipeline.py``) both run exactly this.
    """
    bias = None if loop == 0 or loop_embedding is None else loop_embedding[loop - 1].to(y.dtype)
    if kind != "hyperloop":
        return None, y if bias is None else y + bias
    if loop == 0:
        state = expand_streams(y, streams)
    else:
        state_prev, h_post, *h_res = carry  # (identity H_res carries nothing)
        state = hcs[(loop - 1) % len(hcs)].write_back(state_prev, y, h_post, h_res[0] if h_res else None, bias)
    if loop == passes:
        return None, collapse_streams(state)
    x, h_post, h_res = hcs[loop % len(hcs)].read(state)
    return (state, h_post) + (() if h_res is None else (h_res,)), x


def run_body(kind: str, x: torch.Tensor, *, begin: Block | None, middle: Block, end: Block | None,
             loops: int, layers: Sequence[Block] = (), hcs: Sequence[HyperConnection] = (),
             loop_embedding: torch.Tensor | None = None, streams: int = 1) -> torch.Tensor:
    """Run the layer stack of any model kind on embeddings ``x [s, b, d]``.

    ``begin``/``middle``/``end`` are the three blocks (begin/end None when empty). ``layers`` lists, for
    ``mhc``, every layer's residual-free sub-layer branches in order (attention, MLP, attention, ...), each
    wrapped in its own hyper-connection. ``hcs`` are the kind's HyperConnection modules; for ``hyperloop``
    with one shared module it is reused every loop. ``loop_embedding[i]`` is added to loop i's output
    (looped kinds).
    """
    if kind == "mhc":
        state = expand_streams(x, streams)
        for hc, branch in zip(hcs, layers, strict=True):
            state = hc(state, branch)
        return collapse_streams(state)
    y = begin(x) if begin is not None else x
    passes, carry = num_passes(kind, loops), None
    for loop in range(passes + 1):
        carry, x = loop_boundary(kind, loop, passes, carry, y, hcs, loop_embedding, streams)
        if loop < passes:
            y = middle(x)
    return end(x) if end is not None else x
