"""generate / chat on a run (torch and MLX), a plain HF model and a GGUF, on tiny random models."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from infer_helpers import export_folder, lively_model, synthetic_run  # noqa: E402

from qlocal.infer import Sampling, chat_loop, find_gguf, open_generator, prompt_ids  # noqa: E402

PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # A model whose greedy answers depend on the prompt, so a wrong template or history shows.
    root = tmp_path_factory.getbasetemp()
    return synthetic_run(root, lively_model(root, "qwen2"))


def _same_text(a: str, b: str) -> bool:
    # llama-cpp-python drops the bytes of an unfinished UTF-8 character; transformers shows U+FFFD.
    return a.replace("\ufffd", "") == b.replace("\ufffd", "")


def _peft_greedy(run: Path, messages: list[dict[str, str]], n: int) -> str:
    """What base + adapter answer greedily, computed without qlocal.infer."""
    import peft
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["model_path"]
    tok = AutoTokenizer.from_pretrained(base)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "adapter")).eval()
    text = tok.apply_chat_template(messages, chat_template=(run / "chat_template.jinja").read_text(),
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id])
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_prompt_ids_are_the_training_prefix(arch: str, tokenizer_dir) -> None:
    """The generation prompt is token for token the start of the rendered training example."""
    from transformers import AutoTokenizer

    from qlocal.data.formats import Sample
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(arch))
    for choice in (None, "chatml"):  # the model's own template, and one without bos on Llama
        template, _ = resolve_chat_template(tok, choice)
        msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
        ex = render(Sample("chat", messages=msgs), tok, template)
        ids = prompt_ids(tok, template, msgs[:1])
        assert ex.input_ids[: len(ids)] == ids
        assert ex.loss_mask[: len(ids)] == [0] * len(ids) and ex.loss_mask[len(ids)] == 1


def test_generate_run_torch_matches_peft(run: Path, qlocal_cli) -> None:
    res = qlocal_cli("generate", run, "--prompt", PROMPT, "--max-tokens", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip("\n") == _peft_greedy(run, [{"role": "user", "content": PROMPT}], 8)


def test_generate_input_file(run: Path, tmp_path: Path) -> None:
    from qlocal.infer import generate_file

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": PROMPT, "id": 1}) + "\n" +
                   json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    gen = open_generator(str(run), "torch")
    assert generate_file(gen, inp, tmp_path / "out.jsonl", Sampling(max_tokens=4)) == 2
    rows = [json.loads(ln) for ln in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == 1 and all(isinstance(r["response"], str) for r in rows)
    assert rows[0]["response"] == "".join(gen.chat([{"role": "user", "content": PROMPT}], Sampling(max_tokens=4)))


class _Recorder:
    """Wraps a generator; records the conversation each turn was asked to answer, and the reply."""

    def __init__(self, inner: object) -> None:
        self.inner, self.seen, self.replies = inner, [], []

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        self.seen.append([dict(m) for m in messages])
        self.replies.append("")
        for piece in self.inner.chat(messages, sampling):
            self.replies[-1] += piece
            yield piece


def test_chat_loop_keeps_history_and_resets(run: Path) -> None:
    rec = _Recorder(open_generator(str(run), "torch"))
    out = io.StringIO()
    turns = chat_loop(rec, Sampling(max_tokens=5), system="Be brief.",
                      stdin=io.StringIO("hello\nand then?\n/reset\nhello\n/exit\nnever read\n"), out=out)
    assert turns == 3
    first, second, after_reset = rec.seen
    replies = rec.replies
    assert out.getvalue() == "".join(r + "\n" for r in replies)  # streamed as generated, one reply per turn
    assert len(set(replies[:2])) == 2  # the model answers differently to different turns
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert second == first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "and then?"}]
    assert after_reset == first and replies[2] == replies[0]  # /reset really forgot the history


def test_chat_cli_two_turns_torch(run: Path, qlocal_cli) -> None:
    res = qlocal_cli("chat", run, "--max-tokens", "6", input=f"{PROMPT}\nWhy?\n")
    assert res.returncode == 0, res.stderr
    first = _peft_greedy(run, [{"role": "user", "content": PROMPT}], 6)
    second = _peft_greedy(run, [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "Why?"}], 6)
    assert first != second
    assert res.stdout == f"{first}\n{second}\n"


def test_plain_hf_model_generates(tiny_model_dir) -> None:
    gen = open_generator(str(tiny_model_dir("llama")))
    assert isinstance("".join(gen.chat([{"role": "user", "content": "Hi"}], Sampling(max_tokens=3))), str)


# ---- GGUF ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(run: Path, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    return export_folder(tmp_path_factory.getbasetemp(), run)


def test_find_gguf_reads_export_json(export_dir: Path, tmp_path: Path) -> None:
    assert find_gguf(export_dir) == (export_dir / "model-f16.gguf", None)
    assert find_gguf(export_dir / "model-f16.gguf") == (export_dir / "model-f16.gguf", None)
    # An --adapter-only export: base GGUF + adapter.gguf (the adapter is smaller but is not the model).
    (tmp_path / "base-f16.gguf").write_bytes(b"x" * 100)
    (tmp_path / "adapter.gguf").write_bytes(b"x" * 10)
    (tmp_path / "export.json").write_text(json.dumps({"files": {"f16": {"file": "base-f16.gguf"}},
                                                      "adapter": {"file": "adapter.gguf"}}))
    assert find_gguf(tmp_path) == (tmp_path / "base-f16.gguf", tmp_path / "adapter.gguf")


def test_gguf_generate_and_two_turn_chat(export_dir: Path, run: Path, qlocal_cli) -> None:
    res = qlocal_cli("generate", export_dir, "--prompt", PROMPT, "--max-tokens", "6")
    assert res.returncode == 0, res.stderr
    # The F16 GGUF of the fused model answers like base + adapter in torch (greedy).
    first = _peft_greedy(run, [{"role": "user", "content": PROMPT}], 6)
    assert _same_text(res.stdout, first + "\n")
    res = qlocal_cli("chat", export_dir, "--max-tokens", "6", input=f"{PROMPT}\n/reset\n{PROMPT}\nWhy?\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "history cleared" in res.stderr and "Traceback" not in res.stderr
    # The second turn sees the first reply as history: replay both turns in-process on the same GGUF.
    # (Compared with llama.cpp itself: random byte tokens detokenise differently in transformers.)
    gen = open_generator(str(export_dir))
    sampling = Sampling(max_tokens=6)
    one = "".join(gen.chat([{"role": "user", "content": PROMPT}], sampling))
    two = "".join(gen.chat([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": one},
                            {"role": "user", "content": "Why?"}], sampling))
    assert _same_text(one, first) and one != two
    assert res.stdout == f"{one}\n{one}\n{two}\n"
    with pytest.raises(Exception, match="drop --backend"):
        open_generator(str(export_dir), "torch")


# ---- MLX -----------------------------------------------------------------------------------


def test_mlx_run_generates_like_torch(tmp_path_factory, qlocal_cli) -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    root = tmp_path_factory.getbasetemp()
    mlx_run = synthetic_run(root, lively_model(root, "qwen2"), backend="mlx")
    # --backend picks explicitly; auto is train's rule (tests/test_select.py), not the run's backend.
    assert open_generator(str(mlx_run), "mlx").backend.name == "mlx"
    assert open_generator(str(mlx_run), "torch").backend.name == "torch"
    res = qlocal_cli("generate", mlx_run, "--backend", "mlx", "--prompt", PROMPT, "--max-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert _same_text(res.stdout, _peft_greedy(mlx_run, [{"role": "user", "content": PROMPT}], 6) + "\n")
    res = qlocal_cli("chat", mlx_run, "--backend", "mlx", "--max-tokens", "4", input=f"{PROMPT}\n/reset\n{PROMPT}\n")
    assert res.returncode == 0, res.stderr
    half = len(res.stdout) // 2
    assert res.stdout[:half] == res.stdout[half:] and res.stdout.endswith("\n")


def test_user_errors(tmp_path: Path, qlocal_cli) -> None:
    res = qlocal_cli("chat", tmp_path / "nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "x.txt").write_text("x")
    res = qlocal_cli("generate", tmp_path / "x.txt", "--prompt", "hi")
    assert res.returncode == 2 and "not a run folder" in res.stderr


def test_gguf_context_overflow_keeps_the_chat_going(export_dir: Path, capsys) -> None:
    from qlocal.infer import GGUFGenerator

    gen = GGUFGenerator(export_dir / "model-f16.gguf", n_ctx=256)
    out = io.StringIO()
    turns = chat_loop(gen, Sampling(max_tokens=4), stdin=io.StringIO("word " * 300 + "\nHi\n"), out=out)
    assert turns == 1 and out.getvalue().endswith("\n")  # the long line failed, the short one was answered
    err = capsys.readouterr().err
    assert "no longer fits the context window (n_ctx=256)" in err and "Traceback" not in err


def test_gguf_context_overflow_in_generate_names_the_record_and_the_fix(export_dir: Path, tmp_path: Path,
                                                                        qlocal_cli) -> None:
    """generate is not chat: the error names the input line (or --prompt) and says to shorten the
    prompt or lower --max-tokens, never chat's /reset; nothing is written."""
    from qlocal.errors import UserError
    from qlocal.infer import GGUFGenerator, generate_file

    gen = GGUFGenerator(export_dir / "model-f16.gguf", n_ctx=256)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "word " * 300}) + "\n")
    with pytest.raises(UserError) as e:
        generate_file(gen, src, out, Sampling(max_tokens=4))
    msg = str(e.value)
    assert msg.startswith(f"{src}:2: ") and "(n_ctx=256)" in msg and "shorten the prompt or lower --max-tokens" in msg
    assert "/reset" not in msg and not out.exists()
    from qlocal.infer import gguf_context_length

    n_ctx = min(4096, gguf_context_length(export_dir / "model-f16.gguf") or 4096)  # what the CLI opens it with
    res = qlocal_cli("generate", export_dir, "--prompt", "word " * (2 * n_ctx), "--max-tokens", "4")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "--prompt: the prompt and its answer do not fit" in res.stderr
    assert "/reset" not in res.stderr and "shorten the prompt or lower --max-tokens" in res.stderr
