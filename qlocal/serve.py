"""`qlocal serve`: an OpenAI-compatible HTTP API for a GGUF, through llama-cpp-python's server.

Endpoints are llama-cpp-python's: /v1/chat/completions (streaming too), /v1/completions,
/v1/models, /v1/embeddings. Chats are formatted with the GGUF's own chat template (the one the
run trained with), never a format guessed from the model family. A chat completion with `tools`
(or a history of calls and results) is answered by qlocal.serve_tools: OpenAI `tool_calls` parsed
with the template's own call tag, streaming too.
"""

from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

from qlocal.errors import UserError, missing_extra
from qlocal.infer import find_gguf, gguf_context_length
from qlocal.rundir import check_exists


def _check_port(host: str, port: int) -> None:
    """Fail with one line before loading the model when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise UserError(f"{host}:{port} {why}; pick another --port or --host") from None


def build_app(target: str, n_ctx: int = 4096, alias: str | None = None) -> tuple[object, str, Path]:
    """(ASGI app, model alias, GGUF path) for a .gguf file or an export folder."""
    found = find_gguf(Path(target))
    if found is None:
        check_exists(target)
        raise UserError(f"{target}: not a .gguf file or an export folder with a GGUF; "
                        "make one with qlocal export outputs/<run> --gguf")
    gguf, lora = found
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise missing_extra("llama-cpp-python[server]", "gguf") from None
    name = alias or (Path(target).name if Path(target).is_dir() else gguf.stem)
    from gguf import GGUFReader

    has_template = "tokenizer.chat_template" in GGUFReader(str(gguf)).fields
    settings = ModelSettings(
        model=str(gguf), model_alias=name, n_ctx=min(n_ctx, gguf_context_length(gguf) or n_ctx),
        lora_path=str(lora) if lora else None, verbose=False,
        # The GGUF's template, registered by llama-cpp-python as "chat_template.default".
        chat_format="chat_template.default" if has_template else None)
    from qlocal.serve_tools import ToolCallsMiddleware

    app = create_app(server_settings=ServerSettings(), model_settings=[settings])
    return ToolCallsMiddleware(app), name, gguf


def serve(target: str, host: str = "127.0.0.1", port: int = 8000, n_ctx: int = 4096, alias: str | None = None) -> None:
    """Serve `target` until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn (llama-cpp-python[server])", "gguf") from None
    _check_port(host, port)
    app, name, gguf = build_app(target, n_ctx, alias)
    print(f"serving {gguf} as model '{name}' at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)\n"
          f"  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
