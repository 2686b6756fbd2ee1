"""The torch step's fused pieces (qlocal/backends/torch_fused.py) against the plain path they replace:
same loss, same gradients, on tiny random models and on real packed batches."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from train_helpers import REPO, train_cfg  # noqa: E402


def _head_case(cap: float | None, divisor: float | None, chunk: int) -> tuple[float, float]:
    from qlocal.backends.torch_backend import chunked_target_logprobs
    from qlocal.backends.torch_fused import fused_target_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    y = torch.randint(0, 50, (37,))
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(37)  # an upstream gradient that differs per row, as a preference loss gives
    plain = chunked_target_logprobs(h, y, head, cap, 0, divisor)
    (g_plain,) = torch.autograd.grad((plain * w).sum(), h)
    fused = fused_target_logprobs(h, y, head, cap, chunk, divisor)
    (g_fused,) = torch.autograd.grad((fused * w).sum(), h)
    return float((plain - fused).abs().max().detach()), float((g_plain - g_fused).abs().max())


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("divisor", [None, 4.0])
@pytest.mark.parametrize("chunk", [0, 8])
def test_fused_head_equals_plain_log_softmax(cap: float | None, divisor: float | None, chunk: int) -> None:
    dv, dg = _head_case(cap, divisor, chunk)
    assert dv < 1e-5 and dg < 1e-6, (dv, dg)


def test_fused_head_without_grad_and_chunk_cap() -> None:
    from qlocal.backends.torch_fused import chunk_rows, fused_target_logprobs, head_is_fusable

    head = torch.nn.Linear(8, 20, bias=True).requires_grad_(False)
    h, y = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        got = fused_target_logprobs(h, y, head, None, 2)
    ref = torch.log_softmax(head(h), -1).gather(-1, y[:, None])[:, 0]
    assert torch.allclose(got, ref, atol=1e-6)
    assert head_is_fusable(head) and not head_is_fusable(torch.nn.Linear(8, 20))  # a trained head is not
    assert chunk_rows(1024, 151936) == 441 and chunk_rows(1024, 32000) == 1024 and chunk_rows(0, 151936) == 441


def _packed_batch(model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from qlocal.data.batching import collate_packed
    from qlocal.data.formats import load_samples
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template, _ = resolve_chat_template(tok, None)
    samples, _ = load_samples(str(REPO / "data/messages_sample.jsonl"))
    return collate_packed([render(s, tok, template, max_seq_len=1024) for s in samples[:5]])


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_fused_step_equals_plain_step(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """The fused path (head, per-example attention) against train.fused_kernels off: the same loss
    and gradients on a packed batch (gradients, not weights after an Adam step, whose first update
    is ~lr * sign(grad) and turns float noise on near-zero gradients into full-size differences).
    Gemma 3 has sliding-window layers: its packed attention stays on transformers' masks."""
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.objectives import SFT

    model_dir = tiny_model_dir(arch)
    batch = _packed_batch(model_dir)
    assert len(set(batch["position_ids"][0].tolist()[1:])) > 1 and (batch["position_ids"][0] == 0).sum() == 5
    results = []
    for fused in (False, True):
        b = TorchBackend()
        info = b.setup(model_dir, train_cfg("torch", model_dir, tmp_path, "x", **{
            "lora.dropout": 0.0, "train.fused_kernels": fused}))
        names = set(info["fused_kernels"])
        if fused:
            assert {"head_loss_grad_in_forward", "fused_adamw", "fused_lora_linear"} <= names
            assert ("packed_per_example_sdpa" in names) == (arch != "gemma3"), names
        else:
            assert not names
        summed, _ = b._summed_loss(batch)
        n = SFT().count(batch)
        (summed / n).backward()
        grads = {k: v.grad.detach().clone() for k, v in b.model.named_parameters() if v.requires_grad}
        results.append((float(summed.detach()) / n, grads))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) < 1e-5, (l0, l1)
    for k, g in g0.items():
        assert torch.allclose(g, g1[k], atol=1e-5, rtol=1e-4), k


def test_per_example_attention_never_builds_a_mask(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    """Packed rows under the fused path reach SDPA one example at a time with is_causal and no
    mask: nothing of size T x T exists (what keeps memory linear in the sequence length)."""
    from qlocal.backends.torch_backend import TorchBackend

    model_dir = tiny_model_dir("qwen2")
    batch = _packed_batch(model_dir)
    b = TorchBackend()
    b.setup(model_dir, train_cfg("torch", model_dir, tmp_path, "x", **{"lora.dropout": 0.0}))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):  # noqa: ANN001, ANN003
        seen.append((q.shape[2], attn_mask is None, kw.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    b._summed_loss(batch)[0].backward()
    lengths = [int(x) for x in torch.diff(torch.nonzero(torch.as_tensor(batch["position_ids"][0]) == 0).flatten(),
                                          append=torch.tensor([batch["input_ids"].shape[1]]))]
    layers = b.model.get_base_model().config.num_hidden_layers
    assert seen == [(n, True, True) for n in lengths] * layers


def test_cpu_threads_are_torch_default_unless_set(tiny_model_dir, tmp_path: Path) -> None:
    """No guess from the load average (it starved a dedicated box right after another process):
    torch's own count stands unless train.cpu_threads says otherwise."""
    from qlocal.backends.torch_backend import TorchBackend

    model_dir = tiny_model_dir("qwen2")
    before = torch.get_num_threads()
    try:
        info = TorchBackend().setup(model_dir, train_cfg("torch", model_dir, tmp_path, "x"))
        assert info["cpu_threads"] == before
        info = TorchBackend().setup(model_dir, train_cfg("torch", model_dir, tmp_path, "x", cpu_threads=1))
        assert info["cpu_threads"] == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fused_head_bf16_tracks_fp64_on_confident_and_unlikely_targets() -> None:
    """The bf16 head (no fp32 copy of the logits) against fp64 from the same bf16 logits (their
    rounding is bf16's, in HF as here): log-probs and d logp / d h to bf16's precision on ordinary
    rows, on confident rows (p_target near 1, where bf16 p - 1 would round the gradient away) and
    on rows whose target probability underflows bf16's softmax (recomputed in fp32)."""
    from qlocal.backends.torch_fused import fused_target_logprobs

    torch.manual_seed(0)
    vocab, dim, n = 3000, 32, 48
    head = torch.nn.Linear(dim, vocab, bias=False).to(torch.bfloat16).requires_grad_(False)
    head.weight.normal_()
    y = torch.randint(0, vocab, (n,))
    h = torch.randn(n, dim) * 0.3
    scales = torch.linspace(0.3, 0.8, 16)[:, None]
    h[:16] = head.weight[y[:16]].float() * scales  # confident: the target's logit stands out
    h[16:20] = -3.0 * head.weight[y[16:20]].float()  # the target's logit ~ -96 below the rest
    h = h.to(torch.bfloat16).requires_grad_(True)
    up = torch.rand(n) + 0.5

    y64 = (h.detach() @ head.weight.t()).double().requires_grad_(True)
    ref = torch.log_softmax(y64, -1)[torch.arange(n), y]
    (g_y,) = torch.autograd.grad((ref * up.double()).sum(), y64)
    g_ref = g_y @ head.weight.double()
    got = fused_target_logprobs(h, y, head, None, 20)
    (g_got,) = torch.autograd.grad((got * up).sum(), h)

    p_t = ref.detach().exp()
    confident = (p_t > 0.99) & (p_t < 1 - 1e-5)
    assert confident.sum() >= 4 and (ref.detach()[16:20] < -69).all()  # the cases this test is about
    assert torch.isfinite(got).all()
    err = (got.double() - ref.detach()).abs()
    assert (err <= 4e-3 * ref.detach().abs().clamp(min=1.0)).all(), err.max()
    assert (err[confident] <= 1e-2 * ref.detach()[confident].abs()).all()
    row_err = (g_got.double() - g_ref).norm(dim=-1) / g_ref.norm(dim=-1)
    assert row_err.max() < 2e-2, row_err.max()
    # the naive bf16 gradient (p - 1 at the target, in bf16) is what the precise sum avoids
    p = torch.softmax(h.detach() @ head.weight.t(), -1)
    p[torch.arange(n), y] -= 1.0
    naive = -(p @ head.weight).double() * up.double()[:, None]
    naive_err = (naive - g_ref).norm(dim=-1) / g_ref.norm(dim=-1)
    assert naive_err[confident].max() > 10 * row_err[confident].max()
