"""`qlocal serve`: an OpenAI-compatible server on loopback answers a chat completion."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("uvicorn", reason="needs llama-cpp-python[server] (qlocal[gguf])")
pytest.importorskip("torch")

from infer_helpers import export_folder, free_port, lively_model, served, synthetic_run  # noqa: E402


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp()
    return export_folder(root, synthetic_run(root, lively_model(root, "qwen2")))


def _request(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def test_serve_answers_chat_completion(export_dir: Path, tmp_path: Path) -> None:
    with served(export_dir, tmp_path / "serve.log", "--name", "tiny") as base:
        models = _request(f"{base}/models", timeout=5)
        assert [m["id"] for m in models["data"]] == ["tiny"]
        out = _request(f"{base}/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6, "temperature": 0})
        choice = out["choices"][0]
        assert out["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
        assert 1 <= out["usage"]["completion_tokens"] <= 7 and out["usage"]["prompt_tokens"] > 5
        # The prompt was formatted with the GGUF's own (qwen2/chatml) template: the server counts the
        # same prompt tokens as the HF tokenizer does for that template.
        from transformers import AutoTokenizer

        from qlocal.infer import prompt_ids

        tok = AutoTokenizer.from_pretrained(export_dir / "fused")
        ids = prompt_ids(tok, tok.chat_template, [{"role": "user", "content": "Name a colour."}])
        assert out["usage"]["prompt_tokens"] == len(ids)


def test_serve_errors_are_one_line(tmp_path: Path, qlocal_cli, export_dir: Path) -> None:
    res = qlocal_cli("serve", tmp_path, "--port", str(free_port()))
    assert res.returncode == 2 and "not a .gguf file or an export folder" in res.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = qlocal_cli("serve", export_dir, "--port", str(busy.getsockname()[1]))
    assert res.returncode == 2 and "is in use" in res.stderr and len(res.stderr.strip().splitlines()) == 1
