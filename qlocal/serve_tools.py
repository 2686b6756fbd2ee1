"""Tool calling on `qlocal serve`'s /v1/chat/completions (issue 15).

llama-cpp-python's server renders a request's `tools` into the template but hands the call text back
as plain content. A chat completion that brings tools (or a history with calls and results) is
answered here instead, on the same loaded model and under the server's own lock: the prompt is the
GGUF's template rendered with the tools as training rendered its records (qlocal.infer.gguf_prompt_ids:
schemas and calls normalised, the bos rule), and the output goes through qlocal.tool_calls with the template's tag, so a client gets OpenAI
`tool_calls` and `finish_reason: "tool_calls"`, streamed as OpenAI streams them (one delta naming each
call, then its arguments). Requests without tools go to llama-cpp-python untouched.

tool_choice: "auto" (default) lets the model choose; "none" leaves the tools out of the prompt and
looks for no calls; "required" writes the template's call tag after the generation prompt, so the
model must call; {"type": "function", "function": {"name": N}} does that with only N's schema shown.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from qlocal.tool_calls import StreamParser, check_tools, openai_calls, parse, template_message, template_tag


class RequestError(ValueError):
    """A request this endpoint cannot answer: HTTP 400 with this message."""


@dataclass
class ToolRequest:
    """A chat completion request with tools, checked and in the form the templates read."""

    messages: list[dict]
    tools: list[dict] | None
    model: str | None = None
    parse_calls: bool = True
    force: bool = False
    """tool_choice asks for a call: the tag is written after the generation prompt."""
    stream: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)


def wants_tools(body: dict) -> bool:
    """Whether this endpoint, not llama-cpp-python's, answers the request."""
    msgs = body.get("messages") if isinstance(body.get("messages"), list) else []
    return bool(body.get("tools")) or any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                                          for m in msgs)


def _tools(value: Any) -> list[dict] | None:
    try:
        return check_tools(value)
    except ValueError as e:
        raise RequestError(str(e)) from None


def check_request(body: Any) -> ToolRequest:
    """The request's messages, tools and tool_choice, checked (RequestError names what is wrong)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise RequestError("'messages' must be a non-empty list")
    tools = _tools(body.get("tools"))
    try:
        messages = [template_message(m, f"messages[{i}]") for i, m in enumerate(body["messages"])]
    except ValueError as e:
        raise RequestError(str(e)) from None
    req = ToolRequest(messages, tools, body.get("model"),
                      stream=bool(body.get("stream")))
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        req.tools, req.parse_calls = None, False
    elif choice == "required":
        req.force = True
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools or [] if t["function"]["name"] == name]
        if not chosen:
            raise RequestError(f"tool_choice names {name!r}, which is not in 'tools'")
        req.tools, req.force = chosen, True
    elif choice != "auto":
        raise RequestError("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    if req.force and not tools:
        raise RequestError("tool_choice asks for a call but the request has no 'tools'")
    stop = body.get("stop")
    req.sampling = {"max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
                    "temperature": body.get("temperature", 0.8), "top_p": body.get("top_p", 0.95),
                    "seed": body.get("seed"), "stop": [stop] if isinstance(stop, str) else list(stop or [])}
    return req


class ToolChat:
    """One loaded GGUF (llama_cpp.Llama) answering tool requests with its own chat template."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.template = llama.metadata.get("tokenizer.chat_template")
        self.tag = template_tag(self.template)
        eos = llama.token_eos()
        self.eos = llama.detokenize([eos], special=True).decode("utf-8", "replace") if eos >= 0 else ""

    def prompt(self, req: ToolRequest) -> tuple[list[int], str]:
        """(prompt token ids, the text written for the model after the generation prompt)."""
        if not self.template:
            raise RequestError("this GGUF has no chat template, so it cannot render tools; export a run trained with a tool-capable template")
        if req.parse_calls and not self.tag and (req.tools or req.force):
            raise RequestError("this model's chat template has no tool-call format (it never renders tool_calls); "
                               "export a run trained with a tool-capable template (e.g. Qwen 2.5, Hermes, Llama 3.1)")
        from qlocal.errors import UserError
        from qlocal.infer import gguf_prompt_ids

        prefill = self.tag if req.force and self.tag else ""
        try:
            ids = gguf_prompt_ids(self.llama, self.template, req.messages, req.tools, prefill=prefill)
        except UserError as e:  # a message the training reader refuses
            raise RequestError(str(e)) from None
        except Exception as e:  # raise_exception in the template, a message it cannot render
            raise RequestError(f"the chat template cannot render this conversation ({e})") from None
        return ids, prefill

    def _completion(self, req: ToolRequest, ids: list[int], stream: bool) -> Any:
        s = req.sampling
        return self.llama.create_completion(
            prompt=ids, max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"],
            stop=[t for t in [self.eos, *s["stop"]] if t], stream=stream)

    def _head(self, req: ToolRequest, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": req.model or "qlocal"}

    def completion(self, req: ToolRequest) -> dict:
        """The whole answer as a chat.completion object."""
        ids, prefill = self.prompt(req)
        out = self._completion(req, ids, stream=False)
        text = prefill + out["choices"][0]["text"]
        parsed = parse(text, self.tag if req.parse_calls else None, req.tools, keep_broken=True)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        finish = out["choices"][0]["finish_reason"]
        if parsed.calls:
            message = {"role": "assistant", "content": parsed.content.strip() or None,
                       "tool_calls": openai_calls(parsed.calls)}
            finish = "tool_calls"
        return {**self._head(req, "chat.completion"),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": out["usage"]}

    def chunks(self, req: ToolRequest) -> Iterator[dict]:
        """The answer as chat.completion.chunk objects: content as it comes, each call when complete."""
        ids, prefill = self.prompt(req)
        head = self._head(req, "chat.completion.chunk")

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        parser = StreamParser(self.tag if req.parse_calls else None, req.tools, keep_broken=True)
        n = 0
        yield chunk({"role": "assistant", "content": ""})
        finish = "stop"

        def emit(step: tuple[str, list[dict]]) -> Iterator[dict]:
            nonlocal n
            for delta in self._deltas(step, n):
                n += "id" in delta.get("tool_calls", [{}])[0]
                yield chunk(delta)

        if prefill:
            yield from emit(parser.feed(prefill))
        for part in self._completion(req, ids, stream=True):
            finish = part["choices"][0].get("finish_reason") or finish
            yield from emit(parser.feed(part["choices"][0]["text"]))
        yield from emit(parser.finish())
        yield chunk({}, "tool_calls" if n else finish)

    @staticmethod
    def _deltas(step: tuple[str, list[dict]], first: int) -> Iterator[dict]:
        content, calls = step
        if content:
            yield {"content": content}
        for k, call in enumerate(openai_calls(calls), first):
            fn = call["function"]
            yield {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                   "function": {"name": fn["name"], "arguments": ""}}]}
            yield {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}


class ToolCallsMiddleware:
    """ASGI wrapper over llama-cpp-python's app: tool requests to ToolChat, everything else through."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._chats: dict[int, ToolChat] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or not wants_tools(doc):
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        response = await self._respond(doc)
        await response(scope, receive, send)

    def _chat(self, llama: Any) -> ToolChat:
        if id(llama) not in self._chats:
            self._chats = {id(llama): ToolChat(llama)}  # the proxy holds one model at a time
        return self._chats[id(llama)]

    async def _respond(self, doc: dict) -> Any:
        import contextlib

        from llama_cpp.server.app import get_llama_proxy
        from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
        from starlette.responses import JSONResponse, StreamingResponse

        def error(e: Exception) -> Any:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)

        try:
            req = check_request(doc)
        except RequestError as e:
            return error(e)
        lock = contextlib.asynccontextmanager(get_llama_proxy)
        if not req.stream:
            async with lock() as proxy:
                try:
                    return JSONResponse(await run_in_threadpool(self._chat(proxy(req.model)).completion, req))
                except RequestError as e:
                    return error(e)
        async with lock() as proxy:  # checked before the 200 goes out: a bad template is still a 400
            chat = self._chat(proxy(req.model))
            try:
                chat.prompt(req)
            except RequestError as e:
                return error(e)

        async def events() -> Any:
            async with lock() as proxy:
                async for c in iterate_in_threadpool(self._chat(proxy(req.model)).chunks(req)):
                    yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
