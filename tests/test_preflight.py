"""Preflight before training: will the base model export to GGUF? Decided before weights load.

An architecture the GGUF table lacks (a tiny GPT-NeoX) gets one warning line on stderr before the
training header and trains on; `--require-export` makes it exit 2 with one line and no run folder.
A tokenizer no llama.cpp pre-tokenizer reproduces gives the tokenizer reason. A supported tiny
model gets no warning and `exportable: true`. `qlocal doctor --model` prints the same verdict.
The verdict reads config.json and tokenizer files only, and never raises on an odd folder.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from qlocal.export.preflight import Verdict, export_verdict

REPO = Path(__file__).resolve().parent.parent
DATA = str(REPO / "data/alpaca_sample.jsonl")
QWEN2_TOK = Path(__file__).resolve().parent / "assets/tokenizers/qwen2"
CUSTOM_REGEX = r"\p{L}{1,3}|\p{N}{1,2}|\s|[^\s\p{L}\p{N}]+"  # no llama.cpp pre-tokenizer splits like this
needs_export = pytest.mark.skipif(importlib.util.find_spec("gguf") is None
                                  or importlib.util.find_spec("llama_cpp") is None,
                                  reason="the gguf extra (gguf, llama-cpp-python) is not installed")


def _cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """`qlocal *args` in-process: (exit status, stdout, stderr)."""
    from qlocal import cli

    code = 0
    try:
        cli.main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _train_args(model: Path, out: Path, name: str, *extra: str) -> list[Any]:
    return ["train", "--model", model, "--data", DATA, "--backend", "torch", "--iters", "1", "--batch-size", "2",
            "--max-seq-len", "64", "--output-dir", out, "--name", name, *extra]


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-NeoX (an architecture the GGUF table does not have) with a real tokenizer."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from qlocal.hf import pad_id

    out = tmp_path_factory.mktemp("preflight") / "neox"
    tok = tf.AutoTokenizer.from_pretrained(QWEN2_TOK)
    config = tf.GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=pad_id(tok), tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def custom_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose byte-level BPE splits text in a way no llama.cpp pre-tokenizer does."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from assets.make_tokenizers import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CUSTOM_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = tf.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    out = tmp_path_factory.mktemp("preflight") / "custom"
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    fast.save_pretrained(out)
    return out


# ---------------------------------------------------------------- the verdict

@needs_export
def test_unsupported_architecture_is_the_reason(neox_dir: Path) -> None:
    v = export_verdict(neox_dir)
    assert not v.ok and v.family is None and v.pretokenizer == "qwen2"
    (reason,) = v.reasons  # the tokenizer (Qwen2's) converts; only the architecture does not
    assert reason.startswith("architecture GPTNeoXForCausalLM is not supported (supported: ")
    assert "Qwen2ForCausalLM" in reason
    assert v.line("neox").startswith("export: neox will not export to GGUF: architecture GPTNeoXForCausalLM")


@needs_export
def test_unreproducible_tokenizer_is_the_reason(custom_tok_dir: Path) -> None:
    v = export_verdict(custom_tok_dir)
    assert not v.ok and v.family == "Llama 2/3.x"
    (reason,) = v.reasons
    assert reason.startswith("tokenizer: no llama.cpp pre-tokenizer tokenises like HF: ")
    assert "--allow-tokenizer-mismatch" in reason
    print(f"verdict on a tokenizer no candidate matches: {v.seconds:.2f}s")


@needs_export
def test_supported_model_exports(tiny_model_dir: Any) -> None:
    v = export_verdict(tiny_model_dir("qwen2"))
    assert v.ok and v.reasons == [] and v.family == "Qwen2/Qwen2.5" and v.pretokenizer == "qwen2"
    assert v.line("m").startswith("export: m exports to GGUF (family Qwen2/Qwen2.5, llama.cpp pre-tokenizer 'qwen2'")


@needs_export
@pytest.mark.parametrize("arch,family,pre", [("smollm3", "SmolLM3", "llama-bpe"), ("olmo2", "OLMo 2", "llama-bpe"),
                                             ("mistral_nemo", "Mistral", "tekken"), ("qwen3moe", "Qwen3-MoE", "qwen2")])
def test_new_families_export(arch: str, family: str, pre: str, tiny_model_dir: Any) -> None:
    v = export_verdict(tiny_model_dir(arch))
    assert v.ok and v.family == family and v.pretokenizer == pre, v.reasons


@needs_export
def test_header_llama_cpp_cannot_run_is_the_reason(tiny_model_dir: Any, tmp_path: Path) -> None:
    """A supported family whose config llama.cpp cannot run (SmolLM3 without RoPE on other layers
    than every 4th) is refused before training, with the converter's own line."""
    odd = tmp_path / "smollm3"
    shutil.copytree(tiny_model_dir("smollm3"), odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "no_rope_layers": [1, 0, 1, 0]}))
    v = export_verdict(odd)
    assert not v.ok and v.family == "SmolLM3" and v.pretokenizer == "llama-bpe"
    (reason,) = v.reasons
    assert reason.startswith("config.json: no_rope_layers [1, 0, 1, 0] cannot be exported")


@needs_export
def test_moe_llama_cpp_cannot_run_is_the_reason(tiny_model_dir: Any, tmp_path: Path) -> None:
    """Qwen3-MoE with unnormalised top-k router weights (transformers' default, llama.cpp's qwen3moe
    always renormalises) is refused before training."""
    odd = tmp_path / "qwen3moe"
    shutil.copytree(tiny_model_dir("qwen3moe"), odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    v = export_verdict(odd)
    assert not v.ok and v.family == "Qwen3-MoE"
    (reason,) = v.reasons
    assert reason.startswith("config.json: Qwen3-MoE with norm_topk_prob false cannot be exported")


@needs_export
def test_verdict_imports_no_torch_or_transformers(tiny_model_dir: Any) -> None:
    """config.json + tokenizer files only: a fresh interpreter computes it without torch or transformers."""
    code = ("import json, sys, time; t = time.perf_counter(); from qlocal.export.preflight import export_verdict; "
            f"v = export_verdict({str(tiny_model_dir('qwen2'))!r}); "
            "print(json.dumps({'ok': v.ok, 'seconds': v.seconds, 'total': time.perf_counter() - t, "
            "'heavy': [m for m in ('torch', 'transformers', 'mlx', 'qlocal.backends') if m in sys.modules]}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["ok"] and got["heavy"] == [], got
    print(f"verdict {got['seconds']:.3f}s, {got['total']:.3f}s with its imports")


@pytest.mark.parametrize("case", ["empty", "bad_config", "config_list", "no_tokenizer", "bad_tokenizer_json",
                                  "odd_tokenizer_model"])
def test_odd_folders_give_reasons_never_raise(case: str, tmp_path: Path) -> None:
    folder = tmp_path / case
    folder.mkdir()
    if case != "empty":
        shutil.copy(QWEN2_TOK / "tokenizer_config.json", folder)
        (folder / "config.json").write_text({"bad_config": "{not json", "config_list": "[1, 2]"}.get(
            case, json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})))
        if case in ("bad_config", "config_list"):
            shutil.copy(QWEN2_TOK / "tokenizer.json", folder)
        elif case == "bad_tokenizer_json":
            (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"')
        elif case == "odd_tokenizer_model":
            (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    v = export_verdict(folder)
    assert isinstance(v, Verdict) and not v.ok and v.reasons
    assert all("\n" not in r for r in v.reasons)
    joined = " ".join(v.reasons)
    if case == "empty":
        assert "config.json is missing" in joined
    if case in ("bad_config", "config_list"):
        assert "config.json" in joined and len(v.reasons) == 1  # the tokenizer itself converts
    if case == "no_tokenizer":
        assert "no tokenizer.json or tokenizer.model" in joined
    if case in ("bad_tokenizer_json", "odd_tokenizer_model"):
        assert joined.startswith("tokenizer: ")


def test_missing_gguf_extra_is_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qlocal.export as export_pkg

    for name in ("qlocal.export.gguf_arch", "qlocal.export.pretokenizer", "qlocal.export.gguf_vocab"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.delattr(export_pkg, name.rsplit(".", 1)[1], raising=False)
    monkeypatch.setitem(sys.modules, "gguf", None)
    v = export_verdict(tmp_path)
    assert not v.ok and v.reasons == ["export needs pip install 'qlocal[gguf]' (gguf is not installed)"]


@needs_export
def test_missing_llama_cpp_is_a_reason(tiny_model_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    v = export_verdict(tiny_model_dir("qwen2"))
    assert not v.ok and v.family == "Qwen2/Qwen2.5"
    assert v.reasons == ["the tokenizer cannot be checked: export needs pip install 'qlocal[gguf]' "
                         "(llama-cpp-python is not installed)"]


# ---------------------------------------------------------------- qlocal train and doctor

def test_train_help_lists_require_export(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "train", "--help")
    assert code == 0 and "--require-export" in out


@needs_export
def test_train_warns_before_loading_weights_and_trains_on(neox_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, *_train_args(neox_dir, tmp_path, "warn"))
    assert code == 0, err
    lines = err.splitlines()
    warn = [i for i, ln in enumerate(lines) if ln.startswith("warning: export: ")]
    assert len(warn) == 1, err
    assert lines[warn[0]].startswith(f"warning: export: {neox_dir} will not export to GGUF: architecture "
                                     "GPTNeoXForCausalLM is not supported")
    assert lines[warn[0]].endswith("; training goes on (--require-export makes this an error)")
    backend_line = next(i for i, ln in enumerate(lines) if ln.startswith("backend   "))
    assert warn[0] < backend_line  # printed before the backend loaded the weights
    resolved = yaml.safe_load((tmp_path / "warn/config.yaml").read_text())["resolved"]
    assert resolved["exportable"] is False and "GPTNeoXForCausalLM" in resolved["export_reasons"][0]
    assert (tmp_path / "warn/adapter/adapter_model.safetensors").is_file()


@needs_export
@pytest.mark.parametrize("how", ["flag", "config"])
def test_require_export_stops_before_anything_is_written(how: str, neox_dir: Path, custom_tok_dir: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    extra = ["--require-export"] if how == "flag" else ["--set", "model.require_export=true"]
    for model, why in ((neox_dir, "architecture GPTNeoXForCausalLM is not supported"),
                       (custom_tok_dir, "tokenizer: no llama.cpp pre-tokenizer tokenises like HF")):
        code, _, err = _cli(capsys, *_train_args(model, out, "strict", *extra))
        assert code == 2 and "Traceback" not in err
        (line,) = err.strip().splitlines()
        assert line.startswith(f"error: export: {model} will not export to GGUF: {why}")
        assert "--require-export" in line
        assert not out.exists() or not any(out.iterdir())


@needs_export
def test_supported_model_trains_without_warning(tiny_model_dir: Any, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    code, _, err = _cli(capsys, *_train_args(tiny_model_dir("qwen2"), tmp_path, "ok", "--require-export"))
    assert code == 0, err
    assert "export:" not in err
    resolved = yaml.safe_load((tmp_path / "ok/config.yaml").read_text())["resolved"]
    assert resolved["exportable"] is True and "export_reasons" not in resolved


@needs_export
def test_doctor_prints_the_verdict(neox_dir: Path, custom_tok_dir: Path, tiny_model_dir: Any, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def export_section(model: Any) -> list[str]:
        code, out, _ = _cli(capsys, "doctor", "--model", model)
        assert code == 0
        return [ln.strip() for ln in out.split("Export (--model):\n", 1)[1].splitlines()]

    (line,) = export_section(neox_dir)
    assert line == export_verdict(neox_dir).line(str(neox_dir))
    (line,) = export_section(custom_tok_dir)
    assert line.startswith(f"export: {custom_tok_dir} will not export to GGUF: tokenizer: no llama.cpp")
    qwen = tiny_model_dir("qwen2")
    (line,) = export_section(qwen)
    assert line.startswith(f"export: {qwen} exports to GGUF (family Qwen2/Qwen2.5")
    (line,) = export_section(tmp_path / "nope")
    assert line.startswith("export: ") and "no such model folder" in line
    code, out, _ = _cli(capsys, "doctor")
    assert code == 0 and "Export (--model)" not in out
