"""A model that can learn to stop: a chat template's markers that the base vocabulary lacks are
added as special tokens whose embedding and output rows train with the adapter (issue 14, item 8).

Fast tests: which template a base model without one gets, which markers are missing, that they
render as one trained token, and the PEFT <-> MLX names of trained token rows. Slow tests train a
Llama-3-vocabulary base with ChatML on torch and on MLX until it answers and stops, then check that
the adapter moves between the frameworks, and that the GGUF ends the greedy answer at <|im_end|>.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qlocal import adapters
from qlocal.chat_families import fallbacks
from qlocal.data.templates import (add_missing_markers, missing_markers, native_fallback, resolve_chat_template,
                                   template_markers)
from qlocal.errors import UserError
from qlocal.hf import load_tokenizer

CHATML = ["<|im_start|>", "<|im_end|>"]


def _tok(name: str, tokenizer_dir: Any, added: list[str] | tuple[str, ...] = ()) -> Any:
    return load_tokenizer(tokenizer_dir(name), added=list(added))


def test_markers_of_each_fallback() -> None:
    fb = fallbacks()
    assert template_markers(fb["chatml"]) == CHATML
    assert template_markers(fb["llama3"]) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert template_markers(fb["gemma"]) == ["<start_of_turn>", "<end_of_turn>"]
    assert template_markers(fb["alpaca"]) == []  # plain-text headers: nothing to add


def test_base_without_template_gets_the_one_its_vocabulary_speaks(tokenizer_dir: Any) -> None:
    for name, family in (("llama3", "llama3"), ("qwen2", "chatml"), ("gemma3", "gemma")):
        tok = _tok(name, tokenizer_dir)
        assert native_fallback(tok) == family
        tok.chat_template = None  # a base model ships none
        assert resolve_chat_template(tok, None) == (fallbacks()[family], family)
        added, line = add_missing_markers(tok, None)
        assert added == [] and f"using {family}" in line


def test_vocabulary_without_any_family_is_told_to_choose() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert native_fallback(tok) is None
    with pytest.raises(UserError, match="no chat template.*--chat-template chatml"):
        resolve_chat_template(tok, None)


def test_chatml_on_llama3_adds_its_markers_as_one_trained_token(tokenizer_dir: Any) -> None:
    from qlocal.data.formats import Sample
    from qlocal.data.render import render

    tok = _tok("llama3", tokenizer_dir)
    n = len(tok)
    assert missing_markers(tok, fallbacks()["chatml"]) == CHATML
    assert missing_markers(tok, tok.chat_template) == []  # its own template fits its vocabulary
    assert add_missing_markers(tok, "model") == ([], "")
    added, line = add_missing_markers(tok, "chatml")
    assert added == CHATML and "<|im_start|>, <|im_end|> not in the vocabulary" in line
    assert tok.convert_tokens_to_ids(CHATML) == [n, n + 1]
    assert add_missing_markers(tok, "chatml")[0] == []  # idempotent (resume)
    sample = Sample(kind="chat", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}],
                    where="x:1")
    ex = render(sample, tok, fallbacks()["chatml"])
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert ex.input_ids.count(n) == 2 and ex.input_ids.count(n + 1) == 2  # each marker one token
    assert n + 1 in trained and n not in trained  # the end of the assistant turn is learnt
    # Loaded elsewhere (export, chat, eval) with the run's list, the ids are the same.
    assert _tok("llama3", tokenizer_dir, CHATML).convert_tokens_to_ids(CHATML) == [n, n + 1]


def test_gguf_eot_follows_the_template_when_the_vocabulary_has_several(tokenizer_dir: Any, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from gguf import GGUFWriter

    from qlocal.export.gguf_vocab import write_vocab

    tok = _tok("qwen2", tokenizer_dir)  # ChatML's <|im_end|> is native
    added, _ = add_missing_markers(tok, "llama3")
    assert added == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.save_pretrained(tmp_path / "tok")
    eot = {}
    for name in ("llama3", "chatml"):
        info = write_vocab(GGUFWriter(str(tmp_path / f"{name}.gguf"), "qwen2"), tmp_path / "tok", None, fallbacks()[name])
        eot[name] = info.special_ids["eot"]
    assert eot == {"llama3": tok.convert_tokens_to_ids("<|eot_id|>"), "chatml": tok.convert_tokens_to_ids("<|im_end|>")}


def test_token_rows_names_round_trip() -> None:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    mlx_w = {"model.embed_tokens.trainable_tokens_delta": rows, "lm_head.trainable_tokens_delta": rows + 1,
             "model.layers.0.self_attn.q_proj.lora_a": np.zeros((4, 2), np.float32),
             "model.layers.0.self_attn.q_proj.lora_b": np.zeros((2, 4), np.float32)}
    peft_w = adapters.mlx_to_peft(mlx_w)
    assert np.array_equal(peft_w["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"], rows)
    assert np.array_equal(peft_w["base_model.model.lm_head.token_adapter.trainable_tokens_delta"], rows + 1)
    back = adapters.peft_to_mlx(peft_w)
    assert back.keys() == mlx_w.keys() and all(np.array_equal(back[k], mlx_w[k]) for k in mlx_w)
    assert adapters.lora_modules(back) == {"model.layers.0.self_attn.q_proj": 2}
    assert adapters.token_rows({"trainable_token_indices": [5, 7]}) == {"embed_tokens": [5, 7]}
    assert adapters.vocab_needed({"trainable_token_indices": {"embed_tokens": [5, 7], "lm_head": [5, 7]}}) == 8
    assert adapters.vocab_needed({}) == 0


# ---------------------------------------------------------------- trained until it stops (slow)

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Is water wet?", "Say something.",
             "What colour is the sky?", "How are you?", "Pick a number.", "Is it raining?"]
ANSWER = "Yes."


def _needs(backend: str) -> None:
    for mod in ("torch", "peft", "llama_cpp", "gguf") + (("mlx", "mlx_lm") if backend == "mlx" else ()):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"needs {mod}")


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with the Llama 3 tokenizer (no ChatML tokens), initialised large enough
    (std 0.2) that LoRA can make its logits peaked: at std 0.02 the final norm caps every logit near 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import _tiny_config, tokenizer_path

    tok = AutoTokenizer.from_pretrained(tokenizer_path("llama3"))
    cfg = _tiny_config("llama", tok)
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama3_base") / "model"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_data_check_shows_the_added_markers(tiny_model_dir: Any, qlocal_cli: Any) -> None:
    from train_helpers import DATA

    res = qlocal_cli("data", "check", str(DATA), "--model", str(tiny_model_dir("llama")), "--chat-template", "chatml")
    assert res.returncode == 0, res.stderr
    # data check adds nothing anywhere: it renders as training will and says what training does
    assert res.stderr.strip().splitlines()[-1] == ("chat template chatml: <|im_start|>, <|im_end|> not in the "
                                                   "vocabulary; training adds them as special tokens whose "
                                                   "embedding and output rows train with the adapter")
    assert "[[The capital of France is Paris.<|im_end|>" in res.stdout  # one token, trained


def _train(backend: str, base: Path, tmp: Path) -> Path:
    from qlocal import config as config_mod
    from qlocal.train import train

    data = tmp / "yes.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": ANSWER}) + "\n" for q in QUESTIONS))
    sets = {"model.name": base, "data.path": data, "run.output_dir": tmp / "out", "run.name": backend,
            "train.backend": backend, "train.iters": 40, "train.batch_size": 8, "train.lr": 1e-2,
            "train.lr_schedule": "constant", "model.chat_template": "chatml", "train.save_every": 1000}
    return train(config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()]), quiet=True)


def _reply(run: Path, backend: str) -> str:
    """The run's greedy answer on `backend`, generation ending only at <|im_end|>."""
    from qlocal.backends.base import Sampling
    from qlocal.infer import BackendGenerator, open_backend, prompt_ids, resolve_hf_source

    gen = BackendGenerator(resolve_hf_source(str(run)), open_backend(backend))
    tok = gen.tokenizer
    ids = prompt_ids(tok, gen.template, [{"role": "user", "content": QUESTIONS[0]}])
    return "".join(gen.backend.stream(ids, tok, [tok.convert_tokens_to_ids("<|im_end|>")], Sampling(max_tokens=12)))


def _logits_both(run: Path, base: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(torch + PEFT, MLX) float32 logits of base + the run's adapter on `ids`."""
    import mlx.core as mx
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from qlocal.backends.mlx_infer import load_mlx_model, load_peft_adapter_into_mlx

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    adapters.fit_vocab(model, run / "adapter")
    model = peft.PeftModel.from_pretrained(model, str(run / "adapter")).eval()
    with torch.no_grad():
        t = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    mlx_model, _ = load_mlx_model(base)
    load_peft_adapter_into_mlx(mlx_model, run / "adapter")
    return t, np.array(mlx_model(mx.array(ids)).astype(mx.float32))


def _gguf_greedy(path: Path, prompt: list[int]) -> tuple[str, int]:
    """llama.cpp's greedy continuation of `prompt` up to its first end-of-generation token: (text, that token)."""
    import llama_cpp

    from qlocal.llamacpp import load_llama

    llm = load_llama(path, n_ctx=256)
    out: list[int] = []
    for t in llm.generate(prompt, temp=0.0, top_k=1):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t) or len(out) >= 12:
            return llm.detokenize(out).decode(), t
        out.append(t)
    raise AssertionError("generation ended without a token")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_chatml_on_llama3_base_learns_to_stop_through_export(backend: str, llama3_base: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _needs(backend)
    import gguf

    from qlocal.export.pipeline import ExportOptions, export_run
    from qlocal.infer import prompt_ids

    run = _train(backend, llama3_base, tmp_path)
    assert "chat template chatml: <|im_start|>, <|im_end|> not in the vocabulary" in capsys.readouterr().err
    n = len(load_tokenizer(llama3_base))
    cfg_text = (run / "config.yaml").read_text()
    assert "new_tokens:\n  - <|im_start|>\n  - <|im_end|>" in cfg_text
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["trainable_token_indices"] == {"embed_tokens": [n, n + 1], "lm_head": [n, n + 1]}
    # The answer, and nothing after it: <|im_end|> is the only stop given.
    assert _reply(run, backend) == ANSWER

    # One adapter format: the other framework computes the same model, new tokens included.
    ids = np.array([prompt_ids(load_tokenizer(llama3_base, added=CHATML), fallbacks()["chatml"],
                               [{"role": "user", "content": QUESTIONS[1]}]) + [n + 1, n]])
    t, m = _logits_both(run, llama3_base, ids)
    assert t.shape == m.shape == (1, ids.shape[1], n + 2)
    np.testing.assert_allclose(m, t, atol=2e-3 * np.abs(t).max())
    assert np.array_equal(m.argmax(-1), t.argmax(-1))

    # A GGUF LoRA cannot carry a vocabulary change: one line, nothing written.
    with pytest.raises(UserError, match="cannot .*drop --adapter-only"):
        export_run(run, ExportOptions(quants=["f16"], out_dir=tmp_path / "lora", adapter_only=True))
    assert not (tmp_path / "lora").exists()

    res = export_run(run, ExportOptions(quants=["f16"], out_dir=tmp_path / "export"), echo=lambda _: None)
    assert res.verify_passed
    fused = json.loads((tmp_path / "export" / "fused" / "config.json").read_text())
    assert fused["vocab_size"] == n + 2
    f16 = tmp_path / "export" / "model-f16.gguf"
    reader = gguf.GGUFReader(f16)
    toks, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    for i, text in ((n, "<|im_start|>"), (n + 1, "<|im_end|>")):
        assert bytes(toks.parts[toks.data[i]]).decode() == text
        assert int(types.parts[types.data[i]][0]) == gguf.TokenType.CONTROL
    assert int(reader.fields["tokenizer.ggml.eot_token_id"].parts[-1][0]) == n + 1
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "export" / "Modelfile").read_text()
    prompt = prompt_ids(load_tokenizer(llama3_base, added=CHATML), fallbacks()["chatml"],
                        [{"role": "user", "content": QUESTIONS[2]}])
    assert _gguf_greedy(f16, prompt) == (ANSWER, n + 1)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_resume_keeps_the_added_tokens_and_their_rows(backend: str, tiny_model_dir: Any, tmp_path: Path) -> None:
    """A run resumed from its step-2 checkpoint ends with the same adapter, token rows included."""
    import shutil

    from qlocal.train import train
    from train_helpers import assert_same_adapter, metrics_rows, train_cfg

    _needs(backend)
    cfg = train_cfg(backend, tiny_model_dir("llama"), tmp_path, "full", iters=4,
                    **{"train.save_every": 2, "model.chat_template": "chatml"})
    full = train(cfg, quiet=True)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "adapter")
    shutil.rmtree(sorted((part / "checkpoints").glob("step-*"))[-1])
    train(cfg, resume=part, quiet=True)
    assert [r["step"] for r in metrics_rows(part)] == [1, 2, 3, 4]
    assert "new_tokens:\n  - <|im_start|>\n  - <|im_end|>\n" in (part / "config.yaml").read_text()
    assert_same_adapter(full, part)
    rows = [k for k in _adapter_keys(part) if "trainable_tokens_delta" in k]
    assert len(rows) == 2  # embedding and (untied) head


def _adapter_keys(run: Path) -> list[str]:
    from safetensors.numpy import load_file

    return list(load_file(str(run / "adapter" / "adapter_model.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("arch,template", [("gemma3", "chatml"), ("qwen2", "llama3")])
def test_tied_embedding_rows_move_between_frameworks(backend: str, arch: str, template: str, tiny_model_dir: Any,
                                                      tmp_path: Path) -> None:
    """Tied heads (Gemma's scaled embedding, Qwen's): one set of rows serves the embedding and the
    head, and the adapter gives the same logits on torch + PEFT and on MLX, new tokens included."""
    from qlocal.train import train
    from train_helpers import train_cfg

    _needs("mlx")
    base = tiny_model_dir(arch)
    run = train(train_cfg(backend, base, tmp_path, "r", iters=6, **{"model.chat_template": template}), quiet=True)
    added = template_markers(fallbacks()[template])
    tok = load_tokenizer(base, added=added)
    new = tok.convert_tokens_to_ids(added)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["trainable_token_indices"] == \
        {"embed_tokens": new}
    ids = np.array([tok("Hello there", add_special_tokens=False)["input_ids"] + new + [new[0]]])
    from safetensors.numpy import load_file

    rows = load_file(str(run / "adapter" / "adapter_model.safetensors"))[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    start = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"].mean(0)
    assert np.abs(rows - start).max() > 1e-3  # they started as the mean row and trained
    t, m = _logits_both(run, base, ids)
    assert t.shape[-1] == len(tok)
    np.testing.assert_allclose(m, t, atol=1e-4 * max(1.0, np.abs(t).max()))
    assert np.array_equal(m.argmax(-1), t.argmax(-1))


def _chatml_batches(base: Path) -> list[dict[str, np.ndarray]]:
    from qlocal.data.batching import collate
    from qlocal.data.formats import load_samples
    from qlocal.data.render import render
    from qlocal.hf import pad_id
    from train_helpers import DATA

    tok = load_tokenizer(base, added=CHATML)
    samples, _ = load_samples(str(DATA))
    return [collate([render(s, tok, fallbacks()["chatml"], max_seq_len=96) for s in samples[i * 4:(i + 1) * 4]],
                    pad_id(tok)) for i in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_adapter_switch_covers_the_token_rows_on_both_backends(arch: str, tiny_model_dir: Any, tmp_path: Path) -> None:
    """Off = the model training started from (new rows at the mean) on torch and on MLX alike;
    both start from the same loss, and training moves it."""
    from qlocal import config as config_mod
    from qlocal.backends.select import create_backend

    _needs("mlx")
    base = tiny_model_dir(arch)
    batches = _chatml_batches(base)
    start = {}
    for name in ("torch", "mlx"):
        cfg = config_mod.build(sets=[f"model.name={base}", f"train.backend={name}",
                                     'lora.new_tokens=["<|im_start|>", "<|im_end|>"]'])
        b = create_backend(name)
        b.setup(base, cfg)
        s0, n = b.eval_loss(batches)
        for i in range(3):
            b.train_step([batches[i]], 2e-2)
        s_on, _ = b.eval_loss(batches)
        b.set_adapter_enabled(False)
        s_off, _ = b.eval_loss(batches)
        b.set_adapter_enabled(True)
        assert abs(s_on - s0) / n > 5e-3, (name, s0 / n, s_on / n)
        assert abs(s_off - s0) / n < 1e-5, (name, s0 / n, s_off / n)
        assert b.eval_loss(batches)[0] == pytest.approx(s_on, rel=1e-6)
        start[name] = s0 / n
    assert start["mlx"] == pytest.approx(start["torch"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_qlora_with_added_tokens_exports_and_verifies(backend: str, tiny_model_dir: Any, tmp_path: Path) -> None:
    """4-bit training (NF4 on torch, affine on MLX, where the embedding is quantised too) trains the
    rows in 16/32 bit; the export merges them into the original base and verifies."""
    from qlocal.export.pipeline import ExportOptions, export_run
    from qlocal.train import train
    from train_helpers import train_cfg

    _needs(backend)
    if backend == "torch" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes")
    run = train(train_cfg(backend, tiny_model_dir("llama"), tmp_path, "q", iters=3,
                          **{"train.quantize": "4bit", "model.chat_template": "chatml"}), quiet=True)
    assert len([k for k in _adapter_keys(run) if "trainable_tokens_delta" in k]) == 2
    res = export_run(run, ExportOptions(quants=["f16"], out_dir=tmp_path / "export"), echo=lambda _: None)
    assert res.verify_passed
