"""`qlocal studio` in a real headless Chromium (Debian's `chromium`, driven by Playwright).

The studio runs as `qlocal studio --root <tmp> --port <free>`, as a user starts it; every wait
polls the page (Playwright's expect / wait_for_function), never a fixed sleep. Screenshots of each
page go to tests/artifacts/studio/<test>/ (git-ignored; the path is printed).

Skips, with the reason, where Chromium or Playwright is absent (.ci/run installs chromium with
apt-get; on macOS `brew install chromium`, or set QLOCAL_CHROMIUM to a Chromium binary).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import OFFLINE_ENV, REPO
from infer_helpers import free_port, wait_until_answers

pytest.importorskip("fastapi", reason="needs the studio extra: pip install 'qlocal[studio]'")
pytest.importorskip("playwright", reason="needs playwright (the dev extra): pip install playwright")

ARTIFACTS = REPO / "tests" / "artifacts" / "studio"
HANG_GUARD_S = 900  # only a hung studio or job reaches it; waits below end on page state
WAIT_MS = 600_000  # Playwright's bound per wait: a hang guard, the wait itself polls the page


def chromium_path() -> str | None:
    """The Chromium binary: $QLOCAL_CHROMIUM, else `chromium` (Debian) or `chromium-browser` on PATH."""
    env = os.environ.get("QLOCAL_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium (the system's, via executable_path: no Playwright browser download)."""
    exe = chromium_path()
    if exe is None and os.environ.get("QLOCAL_CHROMIUM"):
        pytest.skip(f"QLOCAL_CHROMIUM={os.environ['QLOCAL_CHROMIUM']}: no such file")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium, as .ci/run does; "
                    "or point QLOCAL_CHROMIUM at a Chromium binary)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: Chromium refuses its sandbox as root (CI containers run as root)
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=exe, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()



def _kill_jobs(root: Path) -> None:
    """Kill the studio jobs still running (each is its own process group), so none outlives the test.
    A job counts as alive only while its pid has the start time recorded for it (no reused pid)."""
    from qlocal.studio.jobs import JobRunner

    for job in JobRunner(root).list():
        if job.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGKILL)


@contextlib.contextmanager
def studio(root: Path, log_path: Path, token: str | None = None) -> Iterator[str]:
    """`qlocal studio --root ROOT [--token T]` on a free loopback port, up once /runs answers; yields its URL."""
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    log = log_path.open("w")
    extra = ["--token", token] if token else []
    proc = subprocess.Popen([sys.executable, "-m", "qlocal", "studio", "--root", str(root), "--port", str(port), *extra],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, url + "/runs" + (f"?token={token}" if token else ""), log_path, HANG_GUARD_S)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_jobs(root)
        log.close()


class Shots:
    """Screenshots of one test, in tests/artifacts/studio/<test>/NN-<name>.png."""

    def __init__(self, test: str) -> None:
        self.dir = ARTIFACTS / test
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.n = 0
        print(f"\nscreenshots: {self.dir}")

    def __call__(self, page: Any, name: str, full_page: bool = True) -> Path:
        self.n += 1
        path = self.dir / f"{self.n:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path


def _working_folder(tmp_path: Path) -> Path:
    root = tmp_path / "work"
    for name in ("outputs", "export", "data", "models"):
        (root / name).mkdir(parents=True)
    shutil.copy(REPO / "data" / "alpaca_sample.jsonl", root / "data" / "alpaca_sample.jsonl")
    return root


@pytest.mark.slow
def test_pages_render_in_chromium(browser: Any, tmp_path: Path) -> None:
    """Every page of an empty studio renders in a real browser without a script error."""
    from playwright.sync_api import expect

    root = _working_folder(tmp_path)
    shots = Shots("pages")
    with studio(root, tmp_path / "studio.log") as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for path, heading in (("/runs", "Runs"), ("/new", "New run"), ("/export", "Export"), ("/chat", "Chat")):
            page.goto(url + path)
            expect(page.locator("h1")).to_have_text(heading)
            expect(page.locator("header nav a.current")).to_have_count(1)
            shots(page, path.strip("/"))
        expect(page.locator("#no-targets")).to_be_visible()
        page.goto(url + "/export")
        expect(page.locator("#no-runs")).to_be_visible()
        # a path outside the working folders is refused, in the browser as anywhere
        resp = page.goto(url + "/chat?target=/etc")
        assert resp is not None and resp.status == 403
        assert errors == [], errors


CHAT_POST = """async () => (await fetch('/api/chat', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({target: 'outputs/none', messages: [{role: 'user', content: 'hi'}]})})).status"""


@pytest.mark.slow
def test_chat_and_export_pages_work_behind_a_token(browser: Any, tmp_path: Path) -> None:
    """With --token, the URL's ?token= lets the browser in (cookie), and the pages' own fetch POSTs
    (same origin, cookie) reach the handlers; a browser without the token gets 401 everywhere."""
    root = _working_folder(tmp_path)
    with studio(root, tmp_path / "studio.log", token="s3cret") as url:
        page = browser.new_page()
        assert page.goto(url + "/chat?token=s3cret").status == 200
        assert page.goto(url + "/export").status == 200  # the cookie alone from here on
        assert page.evaluate(CHAT_POST) == 400  # past the guard: refused by the chat handler's own check
        stranger = browser.new_context().new_page()
        for path in ("/chat", "/export", "/static/chat.js", "/export/jobs/x"):
            assert stranger.goto(url + path).status == 401, path
        assert stranger.evaluate(CHAT_POST) == 401


# --------------------------------------------------------------------------------------------
# The proof: train from the form, watch, stop, resume, finish, export, chat, compare


def _points(page: Any, key: str = "loss") -> int:
    return int(page.locator(f"#chart-{key}").get_attribute("data-points") or 0)


def _wait_points(page: Any, at_least: int, key: str = "loss") -> None:
    page.wait_for_function(
        "([key, n]) => { const d = document.getElementById('chart-' + key);"
        " return d && d.data && d.data.length > 0 && d.data[0].x.length >= n; }",
        arg=[key, at_least], timeout=WAIT_MS)


def _start_run(page: Any, url: str, name: str, iters: int, lr: str) -> None:
    """Fill the New-run form for the tiny model and start it; lands on the run's page."""
    page.goto(url + "/new")
    fields = {"run.name": name, "model.name": "models/tiny", "data.path": "data/alpaca_sample.jsonl",
              "data.max_seq_len": "128", "data.val_split": "0.1", "train.iters": str(iters),
              "train.batch_size": "1", "train.eval_every": str(max(4, iters // 10)), "train.save_every": "1000",
              "train.lr": lr, "lora.rank": "4"}
    for key, value in fields.items():
        page.locator(f"[id='f-{key}']").fill(value)
    page.locator("[id='f-train.backend']").select_option("torch")
    page.locator("#start-button").click()
    page.wait_for_url(f"**/runs/{name}", timeout=WAIT_MS)


@pytest.mark.slow
def test_train_stop_resume_export_chat_compare(browser: Any, tmp_path: Path) -> None:
    """The issue's proof, through the pages only: a run started from the New-run form gains chart
    points while it trains, stops (SIGINT) and resumes to its last step; its export shows a
    passing verify table and its Modelfile; the export answers in Chat (and the base model beside
    it); a second run and the first share one comparison chart."""
    from playwright.sync_api import expect

    from infer_helpers import lively_model

    root = _working_folder(tmp_path)
    # a tiny random Qwen2 initialised wide, so its greedy answers are words rather than one token
    shutil.copytree(lively_model(tmp_path, "qwen2"), root / "models" / "tiny")
    shots = Shots("proof")
    # Enough steps that Stop lands part-way on an idle box too: the tiny model trains ~30 steps/s there
    # (at 24 steps the whole run ended within a second, before the chart's second point arrived).
    iters = 400
    with studio(root, tmp_path / "studio.log") as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # New run -> run page: the loss chart gains points while it trains
        _start_run(page, url, "first", iters, "0.0003")  # lr low enough that 400 steps leave the lively model answering in words
        status = page.locator("#run-status")
        expect(status).to_have_text("running", timeout=WAIT_MS)
        _wait_points(page, 1)
        seen = _points(page)
        _wait_points(page, seen + 1)  # more points arrive without a reload; then stop at once, well before the end
        shots(page, "run-training")

        # Stop: SIGINT, train checkpoints and exits 130 -> stopped, short of the last step
        page.locator("#stop-button").click()
        expect(status).to_have_text("stopped", timeout=WAIT_MS)
        page.reload()  # the stopped run as a fresh visitor sees it
        expect(status).to_have_text("stopped")
        _wait_points(page, 1)
        stopped_at = _points(page)
        assert 0 < stopped_at < iters, f"the run was not stopped part-way (at step {stopped_at} of {iters})"
        shots(page, "run-stopped")

        # Resume: running again, then finished with every step on the chart
        page.locator("#resume-button").click()
        expect(status).to_have_text("running", timeout=WAIT_MS)
        expect(status).to_have_text("finished", timeout=WAIT_MS)
        _wait_points(page, iters)
        xs = page.evaluate("document.getElementById('chart-loss').data[0].x")
        assert xs[-1] == iters and len(set(xs)) == len(xs), xs  # resumed from its checkpoint: no step twice
        _wait_points(page, 1, "val_loss")
        expect(page.locator("#progress-text")).to_contain_text(f"step {iters} / {iters}")
        shots(page, "run-finished")

        # Export: choose f16, start it, follow the log, then the verify table and Modelfile
        page.goto(url + "/export?run=first")
        expect(page.locator("#export-run")).to_have_value("first")
        page.locator("input[name=quant][value=q4_k_m]").uncheck()
        page.locator("input[name=quant][value=f16]").check()
        shots(page, "export-form")
        page.locator("#export-button").click()
        page.wait_for_url("**/export/jobs/*", timeout=WAIT_MS)
        expect(page.locator("#export-result")).to_have_attribute("data-status", "finished", timeout=WAIT_MS)
        row = page.locator("#export-result table.verify tr", has_text="model-f16.gguf")
        expect(row).to_have_count(1)
        expect(row.locator("td").last).to_have_text("pass")
        expect(page.locator("#export-result pre.modelfile")).to_contain_text("FROM ./model-f16.gguf")
        expect(page.locator("#log")).to_contain_text("export written to export/first/")
        shots(page, "export-done")
        verify = json.loads((root / "export" / "first" / "verify.json").read_text(encoding="utf-8"))
        assert verify["passed"] is True

        # Chat with the export (GGUF on llama.cpp), then side by side with the base model
        page.locator("#export-result a", has_text="chat with it").click()
        expect(page.locator("#target")).to_have_value("export/first")
        page.locator("#system").fill("You are terse.")
        page.locator("#message").fill("Give three tips for staying healthy.")
        page.locator("#send").click()
        answer = page.locator("#col-model .msg.assistant").last
        expect(answer).to_have_attribute("data-state", "done", timeout=WAIT_MS)
        assert answer.inner_text().strip(), "the export gave an empty answer"
        shots(page, "chat-export")
        page.locator("#compare-base").check()
        page.locator("#message").fill("Name a color.")
        page.locator("#message").press("Enter")
        for side in ("model", "base"):
            reply = page.locator(f"#col-{side} .msg.assistant").last
            expect(reply).to_have_attribute("data-state", "done", timeout=WAIT_MS)
            assert reply.inner_text().strip(), f"the {side} side gave an empty answer"
        expect(page.locator("#col-base .side-status")).to_contain_text("base tiny")
        shots(page, "chat-compare")

        # A second run, then both on one chart
        _start_run(page, url, "second", 8, "0.0003")
        expect(status).to_have_text("finished", timeout=WAIT_MS)
        page.goto(url + "/runs")
        for name in ("first", "second"):
            expect(page.locator(f"#runs-table tr[data-run={name}]")).to_have_attribute("data-status", "finished")
            page.locator(f"#runs-table input[value={name}]").check()
        shots(page, "runs")
        page.locator("#compare-button").click()
        page.wait_for_url("**/compare?*", timeout=WAIT_MS)
        page.wait_for_function(
            "() => { const d = document.getElementById('chart-loss');"
            " return d && d.data && d.data.length === 2 && d.data.every(t => t.x.length > 0); }", timeout=WAIT_MS)
        traces = page.evaluate("document.getElementById('chart-loss').data.map(t => [t.name, t.x.length])")
        assert sorted(traces) == [["first", iters], ["second", 8]], traces
        shots(page, "compare")

        # the run page of the finished first run; its first screen is the README's docs/studio-run.png
        page.goto(url + "/runs/first")
        expect(status).to_have_text("finished")
        _wait_points(page, iters)
        _wait_points(page, 1, "val_loss")
        shots(page, "run-page")
        shots(page, "run-page-screen", full_page=False)
        assert errors == [], errors
