"""qlocal studio over HTTP: the Runs table from run folders, metrics by polling and by server-sent
events on a real uvicorn, the New-run form's messages equal to the CLI's."""

from __future__ import annotations

import json
import re
import shutil
from html import unescape
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from studio_helpers import live_studio, make_run, metric_row  # noqa: E402

LOCAL = "http://127.0.0.1:7860"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for d in ("outputs", "export", "data", "models"):
        (tmp_path / d).mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    return tmp_path


@pytest.fixture
def client(root: Path):
    from fastapi.testclient import TestClient

    from qlocal.studio.app import create_app

    with TestClient(create_app(root, None), base_url=LOCAL) as c:
        yield c


def test_runs_table_from_run_folders(root: Path, client) -> None:
    make_run(root, "done", steps=10, total=10, checkpoints=(10,), adapter=True, model="org/alpha", method="dpo")
    make_run(root, "halted", steps=4, total=10, checkpoints=(4,), backend="mlx")
    make_run(root, "broken", steps=0, total=10)
    rows = {r["name"]: r for r in client.get("/api/runs").json()}
    assert {n: r["status"] for n, r in rows.items()} == {"done": "finished", "halted": "stopped", "broken": "failed"}
    done = rows["done"]
    assert (done["base_model"], done["method"], done["backend"], done["steps"], done["total_steps"]) == \
        ("org/alpha", "dpo", "torch", 10, 10)
    assert done["last_loss"] == pytest.approx(1.5) and done["last_val_loss"] == pytest.approx(1.6)
    assert done["tokens_per_s"] == 800.0
    assert rows["halted"]["backend"] == "mlx" and rows["halted"]["steps"] == 4
    page = client.get("/runs")
    assert page.status_code == 200
    for name, status in (("done", "finished"), ("halted", "stopped"), ("broken", "failed")):
        assert re.search(rf'data-run="{name}"[^>]*data-status="{status}"', page.text.replace("\n", " "))
    # Every column the table sorts on is carried on each row for the script.
    keys = re.findall(r'class="sortable[^"]*" data-key="([a-z_]+)"', page.text)
    assert keys == ["name", "base_model", "method", "backend", "status", "steps", "last_loss", "last_val_loss",
                    "tokens_per_s", "started"]
    assert all(f"data-{k}=" in page.text for k in keys)


def test_run_page_shows_config_evals_and_exports(root: Path, client) -> None:
    run = make_run(root, "done", steps=10, total=10, checkpoints=(10,), adapter=True)
    (run / "eval-test.json").write_text(json.dumps({"metrics": {"loss": 1.25, "perplexity": 3.49}}))
    exp = root / "export" / "done"
    exp.mkdir()
    (exp / "export.json").write_text(json.dumps({"run": str(run)}))
    (exp / "Modelfile").write_text("FROM ./model-q8_0.gguf\nPARAMETER stop <|im_end|>\n")
    (exp / "verify.json").write_text(json.dumps({"passed": False, "files": [
        {"file": "model-q8_0.gguf", "tokenizer_match": True, "nmse": 1e-4, "nmse_limit": 1e-2, "greedy_agree": 1.0,
         "stops_ok": True, "passed": False, "problems": ["greedy text differs"]}]}))
    page = client.get("/runs/done")
    assert page.status_code == 200
    text = unescape(page.text)
    assert "name: org/base-model" in text and "total_steps: 10" in text  # the resolved config.yaml
    assert "eval-test.json" in text and "3.49" in text
    assert "verify: FAIL" in text and "FAIL: greedy text differs" in text and "PARAMETER stop <|im_end|>" in text
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s"):
        assert f'id="chart-{key}"' in text


def test_missing_run_page_is_the_html_error_page_naming_the_runs(root: Path, client) -> None:
    """/runs/<mistyped> is the studio's 404 page listing the runs outputs/ holds (links to them);
    the same missing run under /api/ stays JSON for the pages' scripts."""
    make_run(root, "alpha", steps=2, total=4, checkpoints=(2,))
    make_run(root, "beta", steps=4, total=4, checkpoints=(4,), adapter=True)
    (root / "outputs" / "not-a-run").mkdir()  # no config.yaml: not listed
    page = client.get("/runs/alpah")
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    text = unescape(page.text)
    assert '<nav>' in text and "no run 'alpah' in outputs/" in text
    links = re.findall(r'<li><a href="(/runs/[^"]+)">([^<]+)</a></li>', page.text)
    assert links == [("/runs/alpha", "alpha"), ("/runs/beta", "beta")]
    assert client.get(links[0][0]).status_code == 200
    api = client.get("/api/runs/alpah")
    assert api.status_code == 404 and api.json() == {"detail": "no run 'alpah' in outputs/"}
    # an unknown page is the same HTML page, without a run list; an empty outputs/ says how to start one
    other = client.get("/nowhere")
    assert other.status_code == 404 and "text/html" in other.headers["content-type"] and "known-runs" not in other.text
    for name in ("alpha", "beta", "not-a-run"):
        shutil.rmtree(root / "outputs" / name)
    assert "outputs/ holds no runs yet" in client.get("/runs/alpha").text


def test_metrics_polling_gets_new_lines_and_a_reset(root: Path, client) -> None:
    run = make_run(root, "r", steps=3, total=10, checkpoints=(3,))
    first = client.get("/api/runs/r/metrics").json()
    assert [r["step"] for r in first["rows"]] == [1, 2, 3] and first["next"] == 3 and not first["reset"]
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(metric_row(4, 1.7)) + "\n" + json.dumps(metric_row(5, 1.6))[:20])  # 5 half-written
    more = client.get(f"/api/runs/r/metrics?after={first['next']}").json()
    assert [r["step"] for r in more["rows"]] == [4] and more["next"] == 4
    # A resume rewrites metrics.jsonl shorter (lines past its checkpoint dropped): everything again.
    (run / "metrics.jsonl").write_text(json.dumps(metric_row(1, 2.0)) + "\n")
    again = client.get(f"/api/runs/r/metrics?after={more['next']}").json()
    assert again["reset"] and [r["step"] for r in again["rows"]] == [1]
    # ETA: the steps left times the measured step time (tokens / tokens_per_s = 0.5 s).
    assert client.get("/api/runs/r").json()["progress"] == {"step": 1, "total": 10, "fraction": 0.1, "eta_s": 4.5}


def _events(lines, want: int) -> list[tuple[str, object]]:
    """Read SSE lines until `want` metrics/reset events arrived: [(event, data)]."""
    out, event = [], None
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event:
            out.append((event, json.loads(line.split(":", 1)[1])))
            if sum(e in ("metrics", "reset") for e, _ in out) >= want:
                return out
            event = None
    return out


def test_event_stream_delivers_new_metrics_lines(root: Path) -> None:
    run = make_run(root, "live", steps=2, total=10, checkpoints=(2,))
    with live_studio(root) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("GET", "/api/runs/live/events") as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.iter_lines()
            got = _events(lines, 1)
            assert [r["step"] for e, rows in got if e == "metrics" for r in rows] == [1, 2]
            with (run / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metric_row(3, 1.8)) + "\n")
            got = _events(lines, 1)
            assert [(e, [r["step"] for r in rows]) for e, rows in got if e == "metrics"] == [("metrics", [3])]
            (run / "metrics.jsonl").write_text(json.dumps(metric_row(1, 2.0)) + "\n")  # rewritten by a resume
            got = _events(lines, 1)
            assert [(e, [r["step"] for r in rows]) for e, rows in got if e in ("metrics", "reset")] == [("reset", [1])]


def _cli_error(qlocal_cli, *sets: str) -> str:
    res = qlocal_cli("train", *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line[len("error: "):]


def _field_errors(html: str) -> dict[str, str]:
    return {k: unescape(v) for k, v in re.findall(r'<div class="error" id="error-([^"]+)">([^<]*)</div>', html)}


@pytest.mark.parametrize("key,value", [("lora.rank", "abc"), ("train.method", "sfft"), ("lora.dropout", "1.5"),
                                       ("train.batch_size", "0"), ("train.lr", "fast"), ("data.format", "csvish"),
                                       ("train.report_to", "tensorbored")])
def test_form_errors_are_the_cli_messages(root: Path, client, qlocal_cli, key: str, value: str) -> None:
    form = {"model.name": "gemma-3-270m", "data.path": "data/train.jsonl", key: value}
    resp = client.post("/new", data=form, headers={"origin": LOCAL})
    assert resp.status_code == 400
    errors = _field_errors(resp.text)
    assert errors == {key: _cli_error(qlocal_cli, f"{key}={value}")}
    assert f'value="{value}"' in resp.text or f'<option value="{value}" selected>' in resp.text  # kept for fixing


def test_form_model_error_is_resolve_models_message(root: Path, client, qlocal_cli) -> None:
    resp = client.post("/new", data={"model.name": "no-such-model", "data.path": "data/train.jsonl"},
                       headers={"origin": LOCAL})
    assert resp.status_code == 400
    assert _field_errors(resp.text)["model.name"] == _cli_error(qlocal_cli, "model.name=no-such-model",
                                                                "data.path=data/train.jsonl")


def test_form_missing_files_are_named(root: Path, client, qlocal_cli) -> None:
    resp = client.post("/new", data={"model.name": "models/absent", "data.path": "data/absent.jsonl"},
                       headers={"origin": LOCAL})
    errors = _field_errors(resp.text)
    assert resp.status_code == 400 and "data/absent.jsonl: no such file" in errors["data.path"]
    cli = qlocal_cli("train", "--set", "model.name=models/absent", "--set", "data.path=data/train.jsonl", cwd=root)
    assert errors["model.name"] == cli.stderr.strip().splitlines()[-1][len("error: "):]


def test_form_existing_run_name_is_the_cli_message(root: Path, client, qlocal_cli) -> None:
    make_run(root, "taken", steps=1, total=2, checkpoints=(1,))
    resp = client.post("/new", data={"model.name": "gemma-3-270m", "data.path": "data/train.jsonl", "run.name": "taken"},
                       headers={"origin": LOCAL})
    assert resp.status_code == 400
    cli = qlocal_cli("train", "--set", "model.name=gemma-3-270m", "--set", "data.path=data/train.jsonl",
                     "--set", "run.output_dir=outputs", "--set", "run.name=taken", cwd=root)
    assert cli.returncode == 2
    assert _field_errors(resp.text)["run.name"] == cli.stderr.strip().splitlines()[-1][len("error: "):]


def test_form_argv_is_qlocal_train_with_the_validated_sets(root: Path) -> None:
    from qlocal.studio.newrun import validate

    args, errors, name = validate({"model.name": "gemma-3-270m", "data.path": "data/train.jsonl", "lora.rank": "16",
                                   "train.iters": "", "run.name": "mine"}, root)
    assert errors == {} and name == "mine"
    assert args == ["train", "--set", "model.name=gemma-3-270m", "--set", f"data.path={(root / 'data/train.jsonl').resolve()}",
                    "--set", "lora.rank=16", "--set", "run.output_dir=outputs", "--set", "run.name=mine"]


def test_new_form_shows_every_field_with_its_default(client) -> None:
    from qlocal.studio.newrun import FIELDS, defaults

    page = client.get("/new").text
    values = defaults()
    assert values["lora.rank"] == "8" and values["train.method"] == "sft"
    for key, _, choices in FIELDS:
        assert f'name="{key}"' in page
        if choices:
            assert f'<option value="{values[key]}" selected>' in page


def test_a_job_that_fails_shows_as_failed_with_its_error(root: Path, client) -> None:
    """A run whose `qlocal train` stops at a user error before making its folder: failed, with the
    CLI's one-line error on its page (here: a hub model that offline mode cannot fetch)."""
    resp = client.post("/new", data={"model.name": "org/not-cached", "data.path": "data/train.jsonl",
                                     "run.name": "f1"}, headers={"origin": LOCAL}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/runs/f1"
    (job,) = client.app.state.studio.jobs.for_run("outputs/f1")
    assert job.args[0] == "train" and client.app.state.studio.jobs.wait(job.id) == 2
    run = client.get("/api/runs/f1").json()
    assert (run["status"], run["returncode"], run["resumable"]) == ("failed", 2, False)
    assert [(r["name"], r["status"]) for r in client.get("/api/runs").json()] == [("f1", "failed")]
    page = unescape(client.get("/runs/f1").text)
    assert "error: org/not-cached: cannot download" in page and 'id="resume-button" hidden' in page
    assert not (root / "outputs" / "f1").exists()


def test_stop_signals_a_job_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop twice (a double click) is one SIGINT: the second would abort train mid-step (qlocal.stop_flag)."""
    import json
    import os
    import signal
    import subprocess
    import time

    from qlocal.studio import jobs as jobs_mod

    runner = jobs_mod.JobRunner(root)
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        folder = runner.dir / "j1"
        folder.mkdir(parents=True)
        (folder / "job.json").write_text(json.dumps({"id": "j1", "args": ["train"], "run": "outputs/x",
                                                     "started": time.time(), "pid": child.pid,
                                                     "proc_start": jobs_mod._proc_start(child.pid)}))
        sent: list[tuple[int, int]] = []
        monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
        for _ in range(3):
            runner.stop("j1")
        assert sent == [(child.pid, signal.SIGINT)]
        assert runner.get("j1").status() == "running" and runner.get("j1").stop_requested()
    finally:
        child.kill()
        child.wait()


def test_studio_command_help_and_lazy_imports(qlocal_cli) -> None:
    res = qlocal_cli("studio", "--help")
    assert res.returncode == 0
    for opt in ("--host", "--port", "--token", "--root", "127.0.0.1", "7860"):
        assert opt in res.stdout
    import subprocess
    import sys

    probe = "import sys, qlocal.cli; print([m for m in ('fastapi', 'uvicorn', 'starlette', 'jinja2', 'plotly') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_studio_address_errors_are_one_line_before_anything_starts(root: Path, qlocal_cli) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = qlocal_cli("studio", "--root", root, "--port", str(port))
    assert res.returncode == 2 and res.stdout == ""  # no "open http://..." for a studio that never started
    assert res.stderr.strip() == f"error: 127.0.0.1:{port} is in use (another studio?); pick another --port or --host"
    res = qlocal_cli("studio", "--root", root, "--host", "no-such-host.invalid")
    assert res.returncode == 2 and res.stdout == "" and res.stderr.strip().count("\n") == 0
    assert "no-such-host.invalid:7860 cannot be bound" in res.stderr
    res = qlocal_cli("studio", "--root", root, "--port", "99999")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "1<=x<=65535" in res.stderr
    assert not (root / ".qlocal-studio").exists()


@pytest.fixture(params=["proc", "psutil", "ps"])
def start_source(request, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Where qlocal.pidfile reads process start times: Linux's /proc, or (as on macOS) psutil, or POSIX ps."""
    import sys

    from qlocal import pidfile

    if request.param == "proc" and not (pidfile.PROC / "self" / "stat").is_file():
        pytest.skip("no /proc here")
    if request.param != "proc":
        monkeypatch.setattr(pidfile, "PROC", tmp_path / "no-proc")  # /proc use disabled
    if request.param == "psutil":
        pytest.importorskip("psutil")
    if request.param == "ps":
        monkeypatch.setitem(sys.modules, "psutil", None)  # what `import psutil` finds when it is not installed
    return request.param


def test_process_start_times_agree_across_sources(start_source: str) -> None:
    import os
    import subprocess
    import time

    from qlocal import pidfile

    ours = pidfile.process_start(os.getpid())
    assert ours is not None and ours <= time.time()
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = pidfile.process_start(child.pid)
        assert started is not None and ours - 2 <= started <= time.time() + 1
    finally:
        child.kill()
        child.wait()
    assert pidfile.process_start(child.pid) is None  # reaped: gone


def test_train_pid_file_says_live_only_for_the_process_that_wrote_it(start_source: str, tmp_path: Path) -> None:
    """train.pid is trusted while its pid is alive and that process started before the file was written
    (a later process that got the same pid is not the trainer), and only on the host that wrote it."""
    import json
    import os
    import socket
    import subprocess
    import time

    from qlocal import pidfile

    run = tmp_path / "run"
    run.mkdir()
    assert pidfile.live_pid(run) is None  # no file
    with pidfile.holding(run):
        assert json.loads((run / "train.pid").read_text())["pid"] == os.getpid()
        assert pidfile.live_pid(run) == os.getpid()
    assert not (run / "train.pid").exists()

    def write(**record: object) -> None:
        (run / "train.pid").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "written": time.time(), **record}))

    write()
    assert pidfile.live_pid(run) == os.getpid()
    # this process started long after that file was written: its pid was reused, the trainer is gone
    write(written=pidfile.process_start(os.getpid()) - 3600)
    assert pidfile.live_pid(run) is None
    write(host="some-other-host")
    assert pidfile.live_pid(run) is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    write(pid=dead.pid)
    assert pidfile.live_pid(run) is None
    (run / "train.pid").write_text("{not json")
    assert pidfile.live_pid(run) is None
    # a file another trainer wrote meanwhile is not removed by this one's exit
    with pidfile.holding(run):
        write(pid=1)
    assert json.loads((run / "train.pid").read_text())["pid"] == 1


def test_a_studio_job_pid_reused_later_is_not_alive(start_source: str, tmp_path: Path) -> None:
    """A job record read after the studio restarted: its pid is the job only if that process started by
    the job's launch (without /proc as with it)."""
    import os
    import time

    from qlocal import pidfile
    from qlocal.studio.jobs import Job, _proc_start

    me = os.getpid()
    ticks = _proc_start(me) if start_source == "proc" else None
    assert Job("j", tmp_path, ["train"], None, time.time(), me, ticks).alive()
    launched_before_me = pidfile.process_start(me) - 3600
    assert not Job("j", tmp_path, ["train"], None, launched_before_me, me, None).alive()


def test_a_live_train_pid_reads_as_running_without_proc(start_source: str, root: Path, client) -> None:
    """The Runs table's status of a run trained from a terminal comes from train.pid (no /proc needed)."""
    from qlocal import pidfile

    make_run(root, "cli", steps=3, total=10)
    with pidfile.holding(root / "outputs" / "cli"):
        assert [(r["name"], r["status"], r["job"]) for r in client.get("/api/runs").json()] == [("cli", "running", None)]
    assert client.get("/api/runs/cli").json()["status"] == "failed"  # no checkpoint, no adapter, no job


def test_terminal_trainings_are_located_from_their_argv(tmp_path: Path) -> None:
    """qlocal.studio.procs: which run folder a `qlocal train` command line writes (the live-process
    side is in tests/test_studio_train.py)."""
    from datetime import datetime

    from qlocal.studio.procs import _default_named, _from_config, _options, _train_args

    py = "/usr/bin/python3"
    assert _train_args([py, "-m", "qlocal", "train", "--resume", "outputs/r"]) == ["--resume", "outputs/r"]
    assert _train_args([py, "/venv/bin/qlocal", "train", "-m", "x"]) == ["-m", "x"]
    assert _train_args([py, "-u", "-m", "qlocal", "train"]) == []
    assert _train_args([py, "-m", "qlocal", "export", "outputs/r"]) is None
    assert _train_args([py, "-m", "pytest", "train"]) is None
    assert _options(["--resume", "outputs/r"]) == {"resume": "outputs/r"}
    assert _options(["--name=a", "-o", "runs", "--set", "run.name=b", "--model", "org/m", "--lr", "1"]) == \
        {"run.name": "b", "run.output_dir": "runs", "model.name": "org/m"}
    (tmp_path / "c.yaml").write_text("run: {name: fromyaml, output_dir: elsewhere}\nmodel: {name: org/y}\n")
    opts = _options(["--config", "c.yaml", "--name", "flag"])
    _from_config(tmp_path, opts)
    assert opts == {"config": "c.yaml", "run.name": "flag", "run.output_dir": "elsewhere", "model.name": "org/y"}
    out = tmp_path / "outputs"
    for name in ("Qwen2.5-0.5B-20261201-100000", "Qwen2.5-0.5B-20261201-100130", "Qwen2.5-0.5B-20261201-100200",
                 "other-20261201-100130"):
        (out / name).mkdir(parents=True)
    started = datetime(2026, 12, 1, 10, 1, 20).timestamp()
    assert _default_named(out, "Qwen/Qwen2.5-0.5B", started) == out / "Qwen2.5-0.5B-20261201-100130"
    assert _default_named(out, "Qwen/Qwen2.5-0.5B", started + 3600) is None
