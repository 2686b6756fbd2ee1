"""Fused pieces of the torch training step (found by profiling a CPU step; used on CUDA too).

- `fused_target_logprobs`: head + log-softmax on target rows with d logp / d h computed in the
  forward, chunk by chunk, so the backward is one multiply: no logits are kept or recomputed, and
  the (targets x vocabulary) softmax gradient exists for one chunk at a time, in place.
- per-segment attention for packed rows: each example of a packed row attends causally to itself
  through SDPA's `is_causal` (no T x T mask, no cross-example blocks computed), registered as a
  transformers attention implementation that falls back to SDPA whenever no segments are given.
- `fuse_lora`: PEFT's LoRA linear layers as three matmuls with no elementwise passes.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

PACKED_ATTENTION = "qlocal_packed_sdpa"
# pieces a benchmark switches off to measure each: "head", "attention", "adamw", "lora"
DISABLED: set[str] = set()
_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one head chunk: bounds the step's largest transient


def chunk_rows(chunk: int, vocab: int) -> int:
    """Target rows per head chunk: `train.loss_chunk`, capped so one chunk's fp32 logits fit in
    256 MiB (1024 rows of a 152k vocabulary would be 600 MiB, twice over during the softmax)."""
    cap = max(64, _CHUNK_BYTES // (4 * max(vocab, 1)))
    return cap if chunk <= 0 else min(chunk, cap)


def head_is_fusable(head: Any) -> bool:
    """A plain frozen linear head: its gradient is never needed, so d logp / d h is all there is."""
    import torch

    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def fused_target_logprobs(h: Any, targets: Any, head: Any, softcap: float | None, chunk: int,
                          divisor: float | None = None) -> Any:
    """log softmax(head(h) / divisor, softcapped)[targets] per row, float32, shape (n,).

    The same function as `torch_backend.chunked_target_logprobs`; its gradient flows to `h` only
    (the head is frozen: `head_is_fusable`). Each row's log-prob depends on that row of `h` alone,
    so the row's gradient is its upstream scalar times a Jacobian row computed here.
    """
    import torch

    class _HeadLogprobs(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hid: Any) -> Any:  # type: ignore[override]
            out, jac = _forward(hid, targets, head.weight, head.bias, softcap, divisor, chunk, ctx.needs_input_grad[0])
            ctx.save_for_backward(jac)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            (jac,) = ctx.saved_tensors
            return (grad[:, None] * jac).to(jac.dtype)

    if not (torch.is_grad_enabled() and h.requires_grad):
        return _forward(h, targets, head.weight, head.bias, softcap, divisor, chunk, False)[0]
    return _HeadLogprobs.apply(h)


def _forward(h: Any, targets: Any, weight: Any, bias: Any, softcap: float | None, divisor: float | None,
             chunk: int, need_jac: bool) -> tuple[Any, Any]:
    import torch

    n = h.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    jac = torch.empty_like(h) if need_jac else None
    step = n if chunk <= 0 else chunk
    # d logp / d y = onehot - p; each chunk builds p - onehot, and the sign and 1/divisor go on the
    # (rows x hidden) product instead of a vocabulary-wide pass
    scale = -1.0 / divisor if divisor else -1.0
    low = weight.dtype == torch.bfloat16 and not softcap
    with torch.no_grad():
        for i in range(0, n, step):
            hc, tc = h[i:i + step], targets[i:i + step]
            rows = torch.arange(tc.shape[0], device=h.device)
            if low:
                out[i:i + step], g = _bf16_chunk(hc, tc, rows, weight, bias, divisor, need_jac)
            else:
                out[i:i + step], g = _fp32_chunk(hc, tc, rows, weight, bias, softcap, divisor, need_jac)
            if jac is not None:
                jac[i:i + step] = torch.mm(g.to(weight.dtype), weight).mul_(scale)
    return out, jac


def _fp32_chunk(hc: Any, tc: Any, rows: Any, weight: Any, bias: Any, softcap: float | None,
                divisor: float | None, need_jac: bool) -> tuple[Any, Any]:
    """(log p[target] per row, p - onehot (times the softcap's derivative) or None) from fp32 logits."""
    import torch

    y = torch.nn.functional.linear(hc, weight, bias).float()
    if divisor:
        y.div_(divisor)
    tanh = None
    if softcap:
        tanh = y.div_(softcap).tanh_()
        y = tanh * softcap
    logp = torch.log_softmax(y, -1)  # one fused pass; y is freed here unless softcapped
    del y
    out = logp[rows, tc]
    if not need_jac:
        return out, None
    g = logp.exp_()  # built in logp's own storage
    g[rows, tc] -= 1.0
    if tanh is not None:
        g.mul_(1.0 - tanh * tanh)
    return out, g


def _bf16_chunk(hc: Any, tc: Any, rows: Any, weight: Any, bias: Any, divisor: float | None,
                need_jac: bool) -> tuple[Any, Any]:
    """The same from bf16 logits without an fp32 copy of the chunk: softmax and sum read bf16 and
    accumulate in fp32, rounding their result once. The target's own entry is 1 - p_t taken as the
    sum of the other p (to bf16's relative precision), so a confident token (p_t near 1, where
    bf16's spacing is 2^-8) keeps its small gradient and its log-prob: log p_t for p_t <= 1/2,
    log1p(-(1 - p_t)) above."""
    import torch

    y = torch.nn.functional.linear(hc, weight, bias)
    if divisor:
        y.div_(divisor)
    p = torch.softmax(y, -1)
    del y
    pt = p[rows, tc].float()
    p[rows, tc] = 0.0
    rest = p.sum(-1).float()  # 1 - p_t; an fp32 sum here would first copy the chunk to fp32
    out = torch.where(pt > 0.5, torch.log1p(-rest), torch.log(pt))
    tiny = pt < 1e-30  # underflowed (or subnormal) in the softmax: these rows again in fp32
    if bool(tiny.any()):
        yf = torch.nn.functional.linear(hc[tiny], weight, bias).float()
        if divisor:
            yf.div_(divisor)
        out[tiny] = torch.log_softmax(yf, -1)[torch.arange(yf.shape[0], device=yf.device), tc[tiny]]
    if not need_jac:
        return out, None
    p[rows, tc] = rest.neg().to(p.dtype)
    return out, p


# -- per-segment attention for packed rows ---------------------------------------------------------

def packed_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention interface: SDPA per example when `qlocal_segments` is passed."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = kwargs.pop("qlocal_segments", None)
    if segments is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    # split, not slices: the backward is one cat per tensor, not a zero-filled full-size gradient per example
    lengths = [e - s for s, e in segments]
    qs, ks, vs = (x.split(lengths, dim=2) for x in (query, key, value))
    parts = [torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                              scale=scaling, enable_gqa=gqa)
             for q, k, v in zip(qs, ks, vs)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def segments_of(position_ids: Any) -> tuple[tuple[int, int], ...]:
    """(start, end) of each example in a packed row (positions restart at 0 for each)."""
    import torch

    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], int(pos.shape[0])]
    return tuple(zip(starts, ends))


_NO_MASK = contextvars.ContextVar("qlocal_no_mask", default=False)


@contextlib.contextmanager
def packed_forward(position_ids: Any) -> Iterator[dict[str, Any]]:
    """Around a decoder call on a packed row under `PACKED_ATTENTION`: transformers builds no mask
    (the model builds it once, before its layers, so a checkpointed layer's recompute needs none),
    and the yielded kwargs carry each example's (start, end) to every attention call."""
    token = _NO_MASK.set(True)
    try:
        yield {"qlocal_segments": segments_of(position_ids)}
    finally:
        _NO_MASK.reset(token)


def _mask(*args: Any, **kwargs: Any) -> Any:
    from transformers.masking_utils import sdpa_mask

    return None if _NO_MASK.get() else sdpa_mask(*args, **kwargs)


def enable_packed_attention(base: Any) -> bool:
    """Switch `base` to per-segment attention if it is an SDPA model whose every layer attends
    fully (no sliding window, no softcap) and a probe of two packed examples gives the hidden
    states of SDPA's block-diagonal mask. Returns whether it was switched."""
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface

    cfg = base.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or text is not cfg:
        return False
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if getattr(cfg, "attn_logit_softcapping", None):
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _mask)
    decoder = base.get_decoder()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(base.get_input_embeddings().weight.shape[0]), (1, 13), generator=gen)
    ids = ids.to(base.get_input_embeddings().weight.device)
    pos = torch.cat([torch.arange(8), torch.arange(5)])[None].to(ids.device)
    # Train mode, as the step runs (an eval-mode forward would repack bitsandbytes 4-bit weights on
    # CPU for good); call it before LoRA is added, so no LoRA dropout makes the two runs differ.
    was_training = decoder.training
    decoder.train()
    try:
        with torch.no_grad():
            ref = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            base.set_attn_implementation(PACKED_ATTENTION)
            with packed_forward(pos) as kw:
                got = decoder(input_ids=ids, position_ids=pos, use_cache=False, **kw).last_hidden_state
        ok = bool(torch.allclose(ref.float(), got.float(), atol=1e-4, rtol=1e-3))
    except Exception:  # any model this does not fit keeps SDPA with transformers' masks
        ok = False
    finally:
        decoder.train(was_training)
    if not ok:
        base.set_attn_implementation("sdpa")
    return ok


# -- LoRA linear layers in three matmuls, no elementwise passes ------------------------------------

def fuse_lora(model: Any) -> int:
    """Route every PEFT LoRA layer over a plain nn.Linear through `_lora_linear` (y = x W^T + b,
    then += s (x A^T) B^T in place; the backward sums both input gradients in one addmm), which
    saves PEFT's scaling multiply and sum, forward and backward. A call the fused form does not
    cover (adapters off or merged, several adapters, dropout, DoRA, an input not in the base's
    dtype) takes PEFT's own forward. LoRA weights may be fp32 over a bf16 base (PEFT keeps them
    fp32): the matmuls then run in bf16 on bf16 copies and the gradients come back fp32 (fp32
    master weights, bf16 compute). Returns how many layers were routed."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.get_base_layer()) is torch.nn.Linear:
            module.forward = _fused_forward(module)
            count += 1
    return count


def _fused_forward(module: Any) -> Any:
    import torch

    plain = type(module).forward

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        active = module.active_adapters
        if args or kwargs or module.disable_adapters or module.merged or len(active) != 1:
            return plain(module, x, *args, **kwargs)
        name = active[0]
        base = module.get_base_layer()
        if (name not in module.lora_A or name in module.lora_variant or base.weight.requires_grad
                or not isinstance(module.lora_dropout[name], torch.nn.Identity)
                or x.dtype != base.weight.dtype or not module.lora_A[name].weight.is_floating_point()):
            return plain(module, x, *args, **kwargs)
        return _lora_linear(x, base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
                            float(module.scaling[name]))

    return forward


def _lora_linear(x: Any, w: Any, b: Any, a: Any, bb: Any, s: float) -> Any:
    import torch

    class _LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, a_master: Any, bb_master: Any) -> Any:  # type: ignore[override]
            x2 = x.reshape(-1, x.shape[-1])
            a, bb = a_master.to(x.dtype), bb_master.to(x.dtype)  # no copy when the dtypes agree
            xa = x2 @ a.t()
            y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
            y.addmm_(xa, bb.t(), alpha=s)
            ctx.save_for_backward(x2, xa, a, bb)
            ctx.shape, ctx.master = x.shape, a_master.dtype
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx: Any, gy: Any) -> Any:  # type: ignore[override]
            x2, xa, a, bb = ctx.saved_tensors
            g2 = gy.reshape(-1, gy.shape[-1])
            gbb = (g2.t() @ xa).mul_(s) if ctx.needs_input_grad[2] else None
            gyb = (g2 @ bb).mul_(s)
            gx = None
            if ctx.needs_input_grad[0]:
                gx = (g2 @ w).addmm_(gyb, a).view(ctx.shape)
            ga = gyb.t() @ x2 if ctx.needs_input_grad[1] else None
            return gx, *(None if g is None else g.to(ctx.master) for g in (ga, gbb))

    return _LoraLinear.apply(x, a, bb)
