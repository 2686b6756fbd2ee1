"""PyTorch backend on tiny random Qwen2, Llama and Gemma 3 models: real training, real adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from qlocal import config as config_mod  # noqa: E402
from qlocal.train import train  # noqa: E402
from train_helpers import REPO, accumulation_batches, assert_trained_run, losses, metrics_rows, train_cfg  # noqa: E402

ARCHS = ("qwen2", "llama", "gemma3")


def _cfg(model: Path, out: Path, name: str, **train_kw: object) -> config_mod.Config:
    return train_cfg("torch", model, out, name, **train_kw)


def _logits(model: object, ids: "torch.Tensor") -> "torch.Tensor":
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_loss_falls_base_untouched_adapter_reloads(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(arch)
    before = load_file(str(model_dir / "model.safetensors"))
    run = train(_cfg(model_dir, tmp_path, arch), quiet=True)
    assert_trained_run(run)

    # The base model on disk is never modified.
    after = load_file(str(model_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)

    # PEFT loads the adapter; base+adapter differs from base, and base weights inside are the originals.
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 47, 2]]) % base.config.vocab_size
    plain = _logits(base, ids)
    tuned = peft.PeftModel.from_pretrained(base, str(run / "adapter"))
    tuned.eval()
    assert (_logits(tuned, ids) - plain).abs().max() > 1e-4
    for k, v in tuned.get_base_model().state_dict().items():
        key = k.replace(".base_layer", "")
        if "lora_" not in k and key in before:
            assert torch.equal(v, before[key]), k
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


def test_saved_adapter_reproduces_trained_logits(tiny_model_dir, tmp_path: Path) -> None:
    """The adapter on disk gives exactly the logits of the model as it was at the end of training."""
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.data.batching import collate
    from qlocal.data.formats import load_samples
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir("qwen2")
    cfg = _cfg(model_dir, tmp_path, "x")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template, _ = resolve_chat_template(tok, None)
    samples, _ = load_samples(str(REPO / "data/alpaca_sample.jsonl"))
    batch = collate([render(s, tok, template, max_seq_len=128) for s in samples[:4]], tok.pad_token_id)
    backend = TorchBackend()
    backend.setup(model_dir, cfg)
    for _ in range(5):
        backend.train_step([batch], 5e-3)
    backend.model.eval()
    ids = torch.from_numpy(batch["input_ids"][:1])
    trained = _logits(backend.model, ids)
    backend.save_adapter(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert torch.allclose(_logits(reloaded, ids), trained, atol=1e-5)


def test_prompt_tokens_carry_no_loss(tiny_model_dir, tmp_path: Path) -> None:
    """The backend's loss is HF's CE with every non-target (prompt) label ignored."""
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.objectives import SFT

    model_dir = tiny_model_dir("llama")
    backend = TorchBackend()
    backend.setup(model_dir, _cfg(model_dir, tmp_path, "x"))
    backend.model.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(2, 12))
    mask = np.zeros_like(ids)
    mask[0, 7:] = 1
    mask[1, 4:9] = 1
    batch = {"input_ids": ids, "loss_mask": mask, "attention_mask": np.ones_like(ids)}
    with torch.no_grad():
        summed, _ = backend._summed_loss(batch)
        n = SFT().count(batch)
        labels = torch.from_numpy(np.where(mask == 1, ids, -100))
        ref = backend.model(input_ids=torch.from_numpy(ids), labels=labels).loss
    assert n == int(mask[:, 1:].sum())
    assert abs(float(summed) / n - float(ref)) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_4bit_loss_falls(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    run = train(_cfg(tiny_model_dir(arch), tmp_path, arch, quantize="4bit"), quiet=True)
    ls = losses(run)
    assert np.mean(ls[-3:]) < ls[0] - 0.05, ls
    resolved = (run / "config.yaml").read_text()
    assert "quantize: 4bit" in resolved
    assert peft.PeftConfig.from_pretrained(str(run / "adapter")).r == 8


def test_options_reach_the_model(tiny_model_dir, tmp_path: Path) -> None:
    """rank/alpha/layers/target modules/grad accumulation/checkpointing/val split all take effect."""
    run = train(_cfg(tiny_model_dir("qwen2"), tmp_path, "opts", iters=4, grad_accum=2, grad_checkpointing="true",
                     **{"lora.rank": 4, "lora.alpha": 8, "lora.layers": 1, "lora.target_modules": "q_proj,v_proj",
                        "data.val_split": 0.1, "train.eval_every": 2, "lora.dropout": 0.1}), quiet=True)
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["layers_to_transform"] == [1]
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    rows = metrics_rows(run)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert all(r["peak_memory_mb"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_grad_accumulation_equals_one_big_batch(tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.backends.torch_backend import TorchBackend

    model_dir = tiny_model_dir("qwen2")
    whole, halves = accumulation_batches()
    results = []
    for batches in ([whole], halves):
        b = TorchBackend()
        b.setup(model_dir, _cfg(model_dir, tmp_path, "x"))
        stats = b.train_step(batches, 1e-2)
        lora = {k: v.detach().clone() for k, v in b.model.named_parameters() if v.requires_grad}
        results.append((stats.loss, lora))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for k in results[0][1]:
        assert torch.allclose(results[0][1][k], results[1][1][k], atol=1e-6), k


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_and_padded_batches_give_the_same_loss_and_grads(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.data.batching import collate, collate_packed
    from qlocal.data.formats import load_samples
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template
    from qlocal.objectives import SFT
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir(arch)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template, _ = resolve_chat_template(tok, None)
    samples, _ = load_samples(str(REPO / "data/messages_sample.jsonl"))
    examples = [render(s, tok, template, max_seq_len=1024) for s in samples[:5]]
    assert len({len(e.input_ids) for e in examples}) > 1, "need ragged lengths to exercise padding"
    padded = collate(examples, tok.pad_token_id or 0)
    packed = collate_packed(examples)
    assert int(packed["loss_mask"][:, 1:].sum()) == int(padded["loss_mask"][:, 1:].sum())

    results = []
    for batch in (padded, packed):
        b = TorchBackend()
        b.setup(model_dir, _cfg(model_dir, tmp_path, "x", **{"lora.dropout": 0.0}))
        # Compare gradients, not parameters after an Adam step: Adam's first step is ~lr*sign(grad),
        # which turns float noise on near-zero gradients into full-size differences.
        summed, _ = b._summed_loss(batch)
        n = SFT().count(batch)
        (summed / n).backward()
        grads = {k: v.grad.detach().clone() for k, v in b.model.named_parameters() if v.requires_grad}
        results.append((float(summed) / n, grads))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for k, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][k], atol=1e-5, rtol=1e-4), k


def test_chunked_loss_equals_full(tiny_model_dir) -> None:
    from qlocal.backends.torch_backend import chunked_target_logprobs

    def chunked_cross_entropy(*args: object) -> "torch.Tensor":
        return -chunked_target_logprobs(*args).sum()

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    for cap in (None, 30.0):
        full = chunked_cross_entropy(h, y, head, cap, 0)
        (g_full,) = torch.autograd.grad(full, h)
        part = chunked_cross_entropy(h, y, head, cap, 8)
        (g_part,) = torch.autograd.grad(part, h)
        assert torch.allclose(full, part, atol=1e-5) and torch.allclose(g_full, g_part, atol=1e-6)


@pytest.mark.parametrize("arch", ["granite", "phi3", "gemma2", "smollm3", "olmo2", "mistral_nemo", "qwen3moe"])
def test_loss_is_the_hf_models_own(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """Step-0 loss (B = 0) is the HF model's own cross-entropy: the head-on-targets-only path keeps
    what HF does after the head (Granite's logits_scaling, Gemma 2's final softcap)."""
    from transformers import AutoModelForCausalLM

    from qlocal.backends.torch_backend import TorchBackend
    from train_helpers import sample_batches

    model_dir = tiny_model_dir(arch)
    batch = sample_batches(model_dir, n=1)[0]
    b = TorchBackend()
    b.setup(model_dir, _cfg(model_dir, tmp_path, "x", **{"lora.dropout": 0.0}))
    with torch.no_grad():
        summed, _ = b._summed_loss(batch)
    ids = torch.as_tensor(batch["input_ids"])
    targets = torch.as_tensor(batch["loss_mask"])[:, 1:].bool()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.as_tensor(batch["attention_mask"])).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    ref = -float(logp[targets].sum())
    assert abs(float(summed) - ref) < 1e-4 * ref, (float(summed), ref)


def test_validation_without_trained_tokens_logs_no_val_loss(tiny_model_dir, tmp_path: Path) -> None:
    """Validation examples whose answers truncation cut away give no val_loss (was a constant 0.0)."""
    val = tmp_path / "val.jsonl"
    long_prompt = " ".join(["word"] * 400)
    val.write_text("".join(json.dumps({"instruction": long_prompt, "output": "short answer"}) + "\n"
                           for _ in range(4)), encoding="utf-8")
    run = train(_cfg(tiny_model_dir("qwen2"), tmp_path, "noval", iters=2, eval_every=1,
                     **{"data.val_path": str(val), "data.max_seq_len": 64}), quiet=True)
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2] and not any("val_loss" in r for r in rows)
