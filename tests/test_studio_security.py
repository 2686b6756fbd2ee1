"""qlocal studio's security: the token on every endpoint off loopback, same-origin POSTs, Host names,
paths confined to the working folders, and form values that never reach a subprocess unvalidated."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from studio_helpers import free_port, make_run, studio_process  # noqa: E402

LOCAL = "http://127.0.0.1:7860"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    for d in ("outputs", "export", "data", "models"):
        (base / d).mkdir(parents=True)
    (base / "data" / "train.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"instruction": "secret", "output": "secret"}\n')
    return base


def _client(root: Path, token: str | None = None, base_url: str = LOCAL):
    from fastapi.testclient import TestClient

    from qlocal.studio.app import create_app

    return TestClient(create_app(root, token), base_url=base_url)


def test_confine_keeps_paths_in_the_working_folders(root: Path) -> None:
    from qlocal.studio.security import PathRefused, confine

    assert confine(root, "data/train.jsonl") == (root / "data/train.jsonl").resolve()
    assert confine(root, str(root / "outputs" / "x")) == (root / "outputs/x").resolve()
    (root / "data" / "escape").symlink_to(root.parent / "outside")
    (root / "data" / "inside").symlink_to(root / "data" / "train.jsonl")
    assert confine(root, "data/inside") == (root / "data/train.jsonl").resolve()
    for bad in ("data/../../outside/secret.jsonl", "../outside/secret.jsonl", "/etc/passwd",
                str(root.parent / "outside" / "secret.jsonl"), "data/escape/secret.jsonl", "config.yaml",
                ".qlocal-studio/jobs", "", "data/\x00x"):
        with pytest.raises(PathRefused):
            confine(root, bad)
    with pytest.raises(PathRefused, match=r"outside the studio's working folders .*; copy it into one of them"):
        confine(root, "/etc/passwd")  # says what to do: a base model in /tmp is the usual case


def test_urls_naming_paths_outside_are_refused(root: Path) -> None:
    make_run(root, "ok", steps=1, total=2, checkpoints=(1,))
    outside_run = root.parent / "outside" / "run"
    make_run(root.parent / "outside" / "x", "run", steps=1, total=2)  # a real run folder, outside root
    (root.parent / "outside" / "x" / "outputs" / "run").rename(outside_run)
    (root / "outputs" / "linked").symlink_to(outside_run)
    with _client(root) as c:
        assert c.get("/runs/ok").status_code == 200
        for url in ("/runs/linked", "/api/runs/linked/metrics", "/api/runs/linked/events",
                    "/api/runs/.qlocal-studio", "/api/compare?run=linked", "/api/compare?run=..%2F..%2Foutside",
                    "/compare?run=ok&run=linked"):
            resp = c.get(url)
            assert resp.status_code == 403, (url, resp.status_code, resp.text)
        for url in ("/api/runs/..", "/runs/..%2F..%2Foutside%2Frun", "/static/..%2F..%2F..%2Fconfig.py", "/static/../app.py"):
            resp = c.get(url)
            assert resp.status_code in (403, 404), (url, resp.status_code)
            assert "secret" not in resp.text and "create_app" not in resp.text
        resp = c.post("/runs/linked/resume", headers={"origin": LOCAL})
        assert resp.status_code == 403
    assert not (root / ".qlocal-studio" / "jobs").exists()


def _walk(routes: list) -> list[tuple[str, set[str]]]:
    """(path, methods) of every route, through included routers (FastAPI keeps them nested)."""
    out = []
    for route in routes:
        if hasattr(route, "effective_route_contexts"):
            out += [(c.path, set(c.methods or {"GET"})) for c in route.effective_route_contexts()]
        elif hasattr(route, "original_router"):
            out += _walk(route.original_router.routes)
        elif getattr(route, "path", None) is not None:
            out.append((route.path, set(getattr(route, "methods", None) or {"GET"})))
    return out


def _concrete_urls(root: Path) -> list[tuple[str, str]]:
    """(method, url) for every route of the app (the pages other modules add included), path
    parameters filled with a fixture run and job."""
    from qlocal.studio.app import create_app

    app = create_app(root, "x")
    out = [("GET", "/static/studio.js"), ("GET", "/static/studio.css"), ("GET", "/no/such/page")]
    for path, methods in _walk(app.routes):
        if path == "/static":
            continue
        url = re.sub(r"\{name\}", "r1", path)
        url = re.sub(r"\{[a-z_]+(:[a-z]+)?\}", "x", url)
        out += [(m, url) for m in sorted(methods) if m != "HEAD"]
    return out


def test_without_the_token_every_endpoint_answers_401(root: Path) -> None:
    make_run(root, "r1", steps=2, total=4, checkpoints=(2,))
    port = free_port()
    with studio_process(root, "--host", "0.0.0.0", "--port", str(port)) as (proc, lines):
        token_line = next(ln for ln in lines if ln.startswith("token"))
        token = token_line.split()[1]
        assert f"?token={token}" in next(ln for ln in lines if ln.startswith("open"))
        urls = _concrete_urls(root)
        remote = proc.stdout.readline()  # 0.0.0.0: the address other machines open, token included
        assert remote.startswith("remote    http://") and f":{port}/?token={token}" in remote
        assert ("POST", "/new") in urls and ("GET", "/api/runs/r1/events") in urls and len(urls) > 15
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for method, url in urls:
                for headers in ({}, {"authorization": "Bearer wrong"}, {"x-qlocal-token": token[:-1]}):
                    resp = http.request(method, url, headers={"origin": f"http://127.0.0.1:{port}", **headers})
                    assert resp.status_code == 401, (method, url, headers, resp.status_code)
            assert http.get("/runs", params={"token": "nope"}).status_code == 401
            ok = http.get("/runs", params={"token": token})
            assert ok.status_code == 200 and "r1" in ok.text
            cookie = ok.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert http.get("/api/runs", headers={"authorization": f"Bearer {token}"}).status_code == 200
            assert http.get("/api/runs/r1/metrics").status_code == 200  # the cookie set above
    assert not (root / ".qlocal-studio" / "jobs").exists()


def test_resolve_token_rules() -> None:
    from qlocal.errors import UserError
    from qlocal.studio.server import resolve_token

    assert resolve_token("127.0.0.1", None) == (None, False)
    assert resolve_token("localhost", "given") == ("given", False)
    assert resolve_token("0.0.0.0", "given") == ("given", False)
    token, generated = resolve_token("0.0.0.0", None)
    assert generated and len(token) >= 24 and token != resolve_token("192.168.1.5", None)[0]
    with pytest.raises(UserError):
        resolve_token("0.0.0.0", " ")


def test_posts_need_the_same_origin_or_the_token_header(root: Path) -> None:
    make_run(root, "r1", steps=2, total=4, checkpoints=(2,))
    form = {"model.name": "gemma-3-270m", "lora.rank": "abc"}  # invalid: answered 400 once let in
    with _client(root) as c:
        assert c.post("/new", data=form).status_code == 403  # no Origin, no Referer
        assert c.post("/new", data=form, headers={"origin": "http://evil.example"}).status_code == 403
        assert c.post("/new", data=form, headers={"origin": "null"}).status_code == 403
        assert c.post("/new", data=form, headers={"referer": "http://evil.example/x"}).status_code == 403
        assert c.post("/new", data=form, headers={"origin": "http://127.0.0.1:7861"}).status_code == 403
        assert c.post("/new", data=form, headers={"origin": LOCAL}).status_code == 400
        assert c.post("/new", data=form, headers={"referer": LOCAL + "/new"}).status_code == 400
        # A DNS-rebinding page reaches the loopback port under another Host name.
        assert c.get("/runs", headers={"host": "evil.example:7860"}).status_code == 403
        assert c.get("/runs", headers={"host": "localhost:7860"}).status_code == 200
    with _client(root, "tok", base_url="http://10.1.2.3:7860") as c:
        # The cookie alone (sent by a browser on any request) does not let a foreign page POST.
        assert c.get("/runs?token=tok").status_code == 200
        assert c.post("/new", data=form, headers={"origin": "http://evil.example"}).status_code == 403
        assert c.post("/new", data=form, headers={"x-qlocal-token": "tok"}).status_code == 400
        assert c.post("/new", data=form, headers={"origin": "http://10.1.2.3:7860"}).status_code == 400


BAD_FORMS = [
    {"lora.rank": "8; touch /tmp/pwned"},
    {"lora.rank": "$(touch /tmp/pwned)"},
    {"model.name": "$(id)"},
    {"model.name": "--resume=/tmp"},
    {"model.name": "~/.cache/huggingface"},
    {"model.name": "/usr/lib"},
    {"data.path": "../outside/secret.jsonl"},
    {"data.path": "/etc/passwd"},
    {"data.path": "data/escape/secret.jsonl"},
    {"data.path": "data/train.jsonl\n--set model.trust_remote_code=true"},
    {"data.val_path": "data/x.jsonl #.yaml"},
    {"model.trust_remote_code": "true"},
    {"run.output_dir": "/tmp"},
    {"run.name": "../../tmp/x"},
    {"run.name": "-rf"},
    {"train.method": "sft --resume /"},
    {"train.backend": "torch\x00"},
    {"lora.target_modules": "{q: k}"},
    {"train.iters": "[1, 2]"},
    {"train.lr": "{a: b}"},
]


def test_invalid_form_values_never_reach_a_subprocess(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qlocal.studio.jobs as jobs

    (root / "data" / "escape").symlink_to(root.parent / "outside")
    started: list[list[str]] = []

    def recorder(argv: list[str], *args: object, **kw: object) -> subprocess.Popen[bytes]:
        started.append(list(argv))
        raise AssertionError(f"a subprocess was started: {argv}")

    monkeypatch.setattr(jobs.subprocess, "Popen", recorder)
    with _client(root) as c:
        for bad in BAD_FORMS:
            form = {"model.name": "gemma-3-270m", "data.path": "data/train.jsonl", **bad}
            resp = c.post("/new", data=form, headers={"origin": LOCAL})
            assert resp.status_code == 400, (bad, resp.status_code)
            assert 'class="error"' in resp.text, bad
    assert started == []
    assert not (root / ".qlocal-studio" / "jobs").exists() or not os.listdir(root / ".qlocal-studio" / "jobs")


def test_the_job_runner_starts_only_qlocal_commands(root: Path) -> None:
    from qlocal.studio.jobs import JobRefused, JobRunner

    runner = JobRunner(root)
    for args in (["sh", "-c", "touch x"], [], ["python", "-c", "1"], ["train", "a\nb"], ["export", "x\x00"],
                 ["serve", "export/x"]):
        with pytest.raises(JobRefused):
            runner.start(args)
    assert runner.list() == []
