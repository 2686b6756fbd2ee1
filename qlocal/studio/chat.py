"""Chat page: stream answers from a run (its base + adapter on the backend it trained on) or an
export (its GGUF on llama-cpp-python), with a system prompt, optionally side by side with the
run's base model answering the same conversation.

Generation goes through qlocal.infer, as `qlocal chat` does (the run's template, its stop tokens,
the GGUF's embedded template). Each loaded model lives on one worker thread of its own: it is
loaded there and every reply is generated there, one at a time, since MLX streams and torch's
grad mode are per thread. Replies reach the browser as newline-delimited JSON over a chunked
response: {"side", "text"} pieces, then {"side", "done"} (or {"side", "error"}) per side.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from qlocal.errors import UserError
from qlocal.studio.pages import studio_of
from qlocal.studio.security import confine

router = APIRouter()
CHAT_FOLDERS = ("outputs", "export")  # what a chat target may name
MAX_LOADED = 2  # models kept in memory (a target and its base); the least recently used goes first
MAX_MESSAGES, MAX_CHARS = 200, 100_000  # a conversation the page sends, bounded
LIMITS = {"max_tokens": (1, 4096), "temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}


@dataclass
class Target:
    """Something to chat with: a finished run or an export folder holding a GGUF."""

    kind: str  # "run" | "export"
    rel: str  # outputs/<name> or export/<name>, what the page sends back
    path: Path

    @property
    def label(self) -> str:
        return f"{self.rel} ({'GGUF, llama.cpp' if self.kind == 'export' else 'run: base + adapter'})"


def list_targets(root: Path) -> list[Target]:
    """Finished runs (adapter saved) and export folders with a GGUF, newest first within each."""
    from qlocal import rundir
    from qlocal.infer import find_gguf

    def newest(paths: list[Path]) -> list[Path]:
        return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)

    outputs, export = root / "outputs", root / "export"
    finished = [outputs / n for n in rundir.run_names(outputs) if (outputs / n / "adapter" / "adapter_config.json").is_file()]
    runs = [Target("run", f"outputs/{p.name}", p) for p in newest(finished)]
    dirs = [p for p in export.iterdir() if p.is_dir() and not p.name.startswith(".")] if export.is_dir() else []
    exports = [Target("export", f"export/{p.name}", p) for p in newest(dirs) if find_gguf(p) is not None]
    return exports + runs


def resolve_target(root: Path, value: str) -> Target:
    """The target a browser named: confined to outputs/ and export/, and one of list_targets."""
    path = confine(root, value, CHAT_FOLDERS)  # PathRefused (403) for anything outside
    for t in list_targets(root):
        if t.path.resolve() == path:
            return t
    if path.parent == (root / "outputs").resolve():  # an unfinished run: still training or stopped, as the CLI says
        from qlocal import rundir

        rundir.check_finished(path, f"outputs/{path.name}")
    raise UserError(f"{value}: not a finished run in outputs/ or an export with a GGUF in export/")


# --------------------------------------------------------------------------------------------
# Models: opened on their own thread, kept while used


def _run_backend(run: Path) -> str | None:
    """The backend a run trained on (its config.yaml), so chat answers as training computed."""
    from qlocal import rundir

    _, resolved = rundir.load_config(run)
    name = resolved.get("backend")
    return name if name in ("torch", "mlx") else None


def _base_source(t: Target) -> tuple[Any, str | None]:
    """(HFSource of the base model without the adapter, backend) for the base side of a comparison."""
    from qlocal.infer import HFSource, resolve_hf_source

    run = t.path
    if t.kind == "export":
        summary = json.loads((t.path / "export.json").read_text(encoding="utf-8")) \
            if (t.path / "export.json").is_file() else {}
        run = Path(str(summary.get("run", "")))
        if not (run / "config.yaml").is_file():
            raise UserError(f"{t.rel}: the run it was exported from ({run}) is gone; the base answers beside "
                            "an export with that run's template, so compare needs the run folder")
    src = resolve_hf_source(str(run))
    # the run's template and settings, without its adapter: what the model answered before training
    return HFSource(src.base_path.name, src.base_path, src.template, None, src.cfg, src.run, src.thinking), _run_backend(run)


def _opener(t: Target, side: str) -> tuple[Callable[[], Any], str]:
    """(function that loads the generator, description) for one side of the chat."""
    from qlocal.infer import BackendGenerator, open_backend, open_generator

    if side == "model":
        if t.kind == "export":
            return (lambda: open_generator(str(t.path))), f"{t.rel} on llama.cpp"
        backend = _run_backend(t.path)
        return (lambda: open_generator(str(t.path), backend)), f"{t.rel} on {backend or 'auto'}"
    src, backend = _base_source(t)

    def load() -> Any:
        return BackendGenerator(src, open_backend(backend))

    return load, f"base {src.base_path.name} on {backend or 'auto'}"


class Loaded:
    """One model on its own worker thread: loaded by its first task, then generating one reply at a time."""

    def __init__(self, load: Callable[[], Any], label: str) -> None:
        self.label = label
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlocal-chat")
        self._load = load
        self._gen: Any = None

    def reply(self, messages: list[dict[str, str]], sampling: Any) -> Iterator[str]:
        """Stream one reply (on the worker thread only), loading the model first if need be.

        A load and its first reply hold a process-wide lock: transformers' loading patches module
        construction process-wide (empty weights on the meta device) and imports its submodules
        lazily, so two models loading (or first generating) at once on two threads break each other.
        """
        if self._gen is not None:
            yield from self._gen.chat(messages, sampling)
            return
        with _load_lock:
            self._gen = self._load()
            yield from self._gen.chat(messages, sampling)

    @property
    def ready(self) -> bool:
        return self._gen is not None

    def close(self) -> None:
        self.pool.shutdown(wait=False)  # the replies queued finish; the model goes with the last reference


_models: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
_models_lock = threading.Lock()
_load_lock = threading.Lock()


def loaded(t: Target, side: str) -> Loaded:
    """The Loaded model for (target, side), opening it (and evicting the least recently used) as needed."""
    key = (str(t.path.resolve()), side)
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        load, label = _opener(t, side)
        _models[key] = Loaded(load, label)
        while len(_models) > MAX_LOADED:
            _models.popitem(last=False)[1].close()
        return _models[key]


def _generate(model: Loaded, side: str, messages: list[dict[str, str]], sampling: Any,
              put: Callable[[dict[str, Any]], None], cancel: threading.Event) -> None:
    """One reply, on the model's worker thread: pieces, then done or error, through `put`."""
    t0 = time.perf_counter()
    try:
        put({"side": side, "status": model.label if model.ready else f"loading {model.label}…"})
        for piece in model.reply(messages, sampling):
            if cancel.is_set():
                break
            if piece:
                put({"side": side, "text": piece})
        put({"side": side, "status": model.label})
        put({"side": side, "done": True, "seconds": round(time.perf_counter() - t0, 2)})
    except UserError as e:
        put({"side": side, "error": str(e)})
    except Exception as e:  # a model that fails to load or generate: the page shows why
        put({"side": side, "error": f"{type(e).__name__}: {e}"})


# --------------------------------------------------------------------------------------------
# Requests


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation from the page: user/assistant turns of text, ending with the user's."""
    if not isinstance(value, list) or not value or len(value) > MAX_MESSAGES:
        raise UserError(f"{where}: a list of 1 to {MAX_MESSAGES} messages")
    out, size = [], 0
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise UserError(f"{where}[{i}]: expected {{\"role\": \"user\"|\"assistant\", \"content\": text}}")
        size += len(m["content"])
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise UserError(f"{where}: the last message must be the user's")
    if size > MAX_CHARS:
        raise UserError(f"{where}: longer than {MAX_CHARS} characters; start a new chat")
    return out


def sampling_of(body: dict[str, Any]) -> Any:
    """Sampling from the request, each value checked against LIMITS."""
    from qlocal.backends.base import Sampling

    kw: dict[str, Any] = {}
    for key, (lo, hi) in LIMITS.items():
        if body.get(key) is None:
            continue
        try:
            v = int(body[key]) if key == "max_tokens" else float(body[key])
        except (TypeError, ValueError):
            raise UserError(f"{key}: not a number") from None
        if not lo <= v <= hi:
            raise UserError(f"{key}: {v} is outside {lo}..{hi}")
        kw[key] = v
    return Sampling(**kw)


async def _stream(sides: list[tuple[str, Loaded, list[dict[str, str]]]], sampling: Any) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def report(side: str) -> Callable[[Any], None]:
        def done(fut: Any) -> None:  # _generate reports its own errors; this catches what escapes it
            if not fut.cancelled() and fut.exception() is not None:
                put({"side": side, "error": f"{type(fut.exception()).__name__}: {fut.exception()}"})
        return done

    for side, model, messages in sides:
        try:
            model.pool.submit(_generate, model, side, messages, sampling, put, cancel).add_done_callback(report(side))
        except RuntimeError:  # its pool shut down: another request unloaded it just now
            put({"side": side, "error": f"{model.label} was unloaded for another model; send again"})
    pending = len(sides)
    try:
        while pending:
            item = await queue.get()
            pending -= int("done" in item or "error" in item)
            yield (json.dumps(item, ensure_ascii=False) + "\n").encode()
    finally:  # the browser went away: stop generating at the next piece
        cancel.set()


@router.post("/api/chat")
async def chat_api(request: Request) -> Any:
    """Body: {target, system?, messages, compare?, base_messages?, max_tokens?, temperature?, top_p?};
    answers NDJSON lines as the module docstring says. Errors before any model runs: 400 with the message."""
    studio = studio_of(request)
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    try:
        target = resolve_target(studio.root, str(body.get("target") or ""))
        system = body.get("system") or ""
        if not isinstance(system, str) or len(system) > MAX_CHARS:
            raise UserError("system: text, please")
        prefix = [{"role": "system", "content": system}] if system.strip() else []
        sampling = sampling_of(body)
        sides = [("model", loaded(target, "model"), prefix + check_messages(body.get("messages"), "messages"))]
        if body.get("compare"):
            base_msgs = check_messages(body.get("base_messages") or body.get("messages"), "base_messages")
            sides.append(("base", loaded(target, "base"), prefix + base_msgs))
    except UserError as e:
        raise HTTPException(400, str(e)) from None
    return StreamingResponse(_stream(sides, sampling), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/chat", response_class=HTMLResponse)
async def chat_page(request: Request, target: str = "") -> Any:
    """The chat page: target, system prompt, sampling, and the conversation (one column, or two
    with the base model beside it)."""
    studio = studio_of(request)
    targets = list_targets(studio.root)
    chosen, error = "", ""
    if target:
        try:
            chosen = resolve_target(studio.root, target).rel  # a path outside the folders: 403
        except UserError as e:
            error = str(e)
    return studio.templates.TemplateResponse(request, "chat.html", {
        "nav": "chat", "targets": targets, "chosen": chosen or (targets[0].rel if targets else ""),
        "limits": LIMITS, "error": error})
