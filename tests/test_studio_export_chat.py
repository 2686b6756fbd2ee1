"""The studio's Export and Chat endpoints without a browser (FastAPI's TestClient on create_app).

Fast: what the forms may start (the export argv, its refusals with the CLI's messages), what a
chat request may name and send. Slow: a streamed chat answer from an export equals llama.cpp's
own greedy answer, and from a run (and its base beside it) equals transformers' greedy generate
with the run's template, PEFT adapter on and off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="needs the studio extra: pip install 'qlocal[studio]'")

from qlocal.errors import UserError  # noqa: E402

ORIGIN = {"origin": "http://127.0.0.1"}  # the same-origin header a browser's POST carries


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "work"
    for name in ("outputs", "export", "data", "models"):
        (root / name).mkdir(parents=True)
    return root


def _client(root: Path) -> Any:
    from fastapi.testclient import TestClient

    from qlocal.studio.app import create_app

    return TestClient(create_app(root, None), base_url="http://127.0.0.1")


def _fake_finished_run(root: Path, name: str, adapter: bool = True) -> Path:
    """A run folder as far as the Export page looks: config.yaml, and adapter/ when finished."""
    run = root / "outputs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: m\nresolved:\n  backend: torch\n", encoding="utf-8")
    if adapter:
        (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run


def test_export_args_are_the_clis_and_refusals_use_its_messages(tmp_path: Path) -> None:
    from qlocal.export.quantize import ALL_QUANTS, parse_quants
    from qlocal.studio.exports import export_args, quant_choices
    from qlocal.studio.security import PathRefused

    root = _root(tmp_path)
    _fake_finished_run(root, "done")
    _fake_finished_run(root, "half", adapter=False)
    studio = _client(root).app.state.studio
    assert quant_choices() == tuple(ALL_QUANTS)
    args, rel = export_args(studio, "done", ["f16", "Q8_0"], " Be brief. ")
    assert args == ["export", "outputs/done", "--quant", ",".join(parse_quants(["f16", "Q8_0"])), "--system", "Be brief."]
    assert rel == "outputs/done"
    with pytest.raises(UserError) as bad:
        export_args(studio, "done", ["f16", "q9_z"], "")
    with pytest.raises(UserError) as cli:
        parse_quants(["q9_z"])
    assert str(bad.value) == str(cli.value)  # the message `qlocal export --quant q9_z` prints
    _unfinished_runs_refused_as_the_cli_says(root, lambda name: export_args(studio, name, ["f16"], ""))
    with pytest.raises(UserError, match="at least one quant"):
        export_args(studio, "done", [], "")
    with pytest.raises(UserError, match="one line"):
        export_args(studio, "done", ["f16"], "a\nFROM /etc/passwd")
    for name in ("../done", "/etc", "done/../../x", ".hidden"):
        with pytest.raises(PathRefused):
            export_args(studio, name, ["f16"], "")


def _unfinished_runs_refused_as_the_cli_says(root: Path, use: Any) -> None:
    """`use(name)` on an unfinished run raises qlocal.rundir.check_finished's line for outputs/<name>:
    never checkpointed, stopped at its last checkpoint (--resume), still training (its train.pid)."""
    import os

    from qlocal import pidfile

    with pytest.raises(UserError) as never:
        use("half")
    assert str(never.value) == ("outputs/half: training ended before its first checkpoint, so there is nothing "
                                "to use; train it again")
    stopped = _fake_finished_run(root, "stopped", adapter=False)
    (stopped / "checkpoints" / "step-00000004").mkdir(parents=True)
    (stopped / "checkpoints" / "step-00000004" / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError) as stop:
        use("stopped")
    assert str(stop.value) == ("outputs/stopped: training stopped at step 4 before the end, so there is no adapter/ "
                               "yet; finish it with: qlocal train --resume outputs/stopped")
    running = _fake_finished_run(root, "running", adapter=False)
    with pidfile.holding(running), pytest.raises(UserError) as live:  # what train holds while it runs
        use("running")
    assert str(live.value).startswith(f"outputs/running: is still training (pid {os.getpid()}); its adapter/ is written")


def test_every_run_listing_is_rundir_run_names(tmp_path: Path) -> None:
    """The CLI's 'outputs/ holds ...', the studio's Runs table, its 404 page and Chat's targets list
    the same folders: config.yaml present, hidden (an atomic temp) never."""
    import re

    from qlocal import rundir
    from qlocal.studio.chat import list_targets

    root = _root(tmp_path)
    for name in ("b", "a", ".a.tmp-123"):
        _fake_finished_run(root, name)
    (root / "outputs" / "plain").mkdir()  # no config.yaml: not a run
    (root / "export" / "a").mkdir()
    (root / "export" / "a" / "export.json").write_text("{}", encoding="utf-8")
    assert rundir.run_names(root / "outputs") == ["a", "b"]
    assert rundir.run_names(root / "export") == [] and rundir.run_names(root / "export", exports=True) == ["a"]
    assert rundir.run_names(root / "nowhere") == []
    with pytest.raises(UserError, match=r"holds a, b$"):
        rundir.check_exists(root / "outputs" / "x")
    client = _client(root)
    assert sorted(r["name"] for r in client.get("/api/runs").json()) == ["a", "b"]
    assert re.findall(r'<li><a href="/runs/([^"]+)">', client.get("/runs/x").text) == ["a", "b"]
    assert sorted(t.rel for t in list_targets(root)) == ["outputs/a", "outputs/b"]


def test_export_form_shows_errors_and_starts_nothing(tmp_path: Path) -> None:
    root = _root(tmp_path)
    _fake_finished_run(root, "done")
    client = _client(root)
    page = client.get("/export?run=done")
    assert page.status_code == 200 and 'value="done" selected' in page.text
    for q in ("f16", "q8_0", "q4_k_m"):
        assert f'value="{q}"' in page.text
    r = client.post("/export", data={"run": "done", "quant": ["f16", "bogus"]}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 400 and "--quant &#39;bogus&#39; is not supported" in r.text
    r = client.post("/export", data={"run": "nope", "quant": ["f16"]}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 404 and "no run" in r.text
    _fake_finished_run(root, "half", adapter=False)  # the form again, with rundir.check_finished's line
    r = client.post("/export", data={"run": "half", "quant": ["f16"]}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 400 and "outputs/half: training ended before its first checkpoint" in r.text
    r = client.post("/export", data={"run": "../../etc", "quant": ["f16"]}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 403
    assert client.app.state.studio.jobs.list() == []  # no refused form reached a subprocess
    assert client.get("/export/jobs/nope").status_code == 404


def test_chat_requests_are_confined_and_checked(tmp_path: Path) -> None:
    from qlocal.studio.chat import check_messages, sampling_of

    root = _root(tmp_path)
    _fake_finished_run(root, "done")
    client = _client(root)
    user = [{"role": "user", "content": "hi"}]
    for target in ("/etc", "../outputs/done", "data/x", "models"):
        r = client.post("/api/chat", json={"target": target, "messages": user}, headers=ORIGIN)
        assert r.status_code == 403, (target, r.text)
    r = client.post("/api/chat", json={"target": "outputs/nope", "messages": user}, headers=ORIGIN)
    assert r.status_code == 400 and "not a finished run" in r.json()["detail"]
    _fake_finished_run(root, "half", adapter=False)  # an unfinished run: rundir.check_finished's line, as JSON
    r = client.post("/api/chat", json={"target": "outputs/half", "messages": user}, headers=ORIGIN)
    assert r.status_code == 400 and r.json()["detail"].startswith("outputs/half: training ended before its first")
    r = client.post("/api/chat", json={"target": "outputs/done", "messages": user, "temperature": 9}, headers=ORIGIN)
    assert r.status_code == 400 and "temperature" in r.json()["detail"]
    assert client.post("/api/chat", json={"target": "outputs/done", "messages": user}).status_code == 403  # no Origin
    assert client.get("/chat?target=/etc/passwd").status_code == 403
    page = client.get("/chat?target=outputs/done")
    assert page.status_code == 200 and 'value="outputs/done" selected' in page.text
    with pytest.raises(UserError, match="last message"):
        check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages")
    with pytest.raises(UserError, match=r"messages\[0\]"):
        check_messages([{"role": "system", "content": "a"}], "messages")
    with pytest.raises(UserError):
        check_messages([], "messages")
    assert sampling_of({"max_tokens": "12", "temperature": 0}).max_tokens == 12
    with pytest.raises(UserError, match="max_tokens"):
        sampling_of({"max_tokens": 0})


# --------------------------------------------------------------------------------------------
# Streaming answers, checked against the libraries' own generation


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A studio folder with a run of a lively tiny model (outputs/r) and its F16 export (export/r)."""
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from infer_helpers import export_folder, lively_model, synthetic_run

    base = tmp_path_factory.mktemp("studio_chat")
    root = _root(base)
    run = synthetic_run(base, lively_model(base, "qwen2"))
    shutil.copytree(run, root / "outputs" / "r")
    shutil.copytree(export_folder(base, run), root / "export" / "r")
    return root


def _chat(client: Any, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Stream one chat request; per side its joined text and its final line."""
    out: dict[str, dict[str, Any]] = {}
    with client.stream("POST", "/api/chat", json=body, headers=ORIGIN) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            item = json.loads(line)
            side = out.setdefault(item["side"], {"text": "", "pieces": 0})
            if "text" in item:
                side["text"] += item["text"]
                side["pieces"] += 1
            elif "done" in item or "error" in item:
                side["end"] = item
    return out


MESSAGES = [{"role": "user", "content": "Give three tips for staying healthy."}]
SYSTEM = "You are terse."


@pytest.mark.slow
def test_chat_with_an_export_streams_llama_cpps_greedy_answer(work: Path) -> None:
    from llama_cpp import Llama

    client = _chat_client(work)
    got = _chat(client, {"target": "export/r", "system": SYSTEM, "messages": MESSAGES, "max_tokens": 24})
    assert got["model"]["end"] == {**got["model"]["end"], "done": True}, got
    llm = Llama(str(work / "export" / "r" / "model-f16.gguf"), n_ctx=512, verbose=False, seed=0)
    llm.chat_format = "chat_template.default"  # the GGUF's own template, as qlocal chat uses it
    ref = llm.create_chat_completion(messages=[{"role": "system", "content": SYSTEM}, *MESSAGES],
                                     max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
    assert got["model"]["text"] == ref and ref.strip()
    assert got["model"]["pieces"] > 1  # streamed piece by piece, not one block


@pytest.mark.slow
def test_chat_with_a_run_and_its_base_match_transformers_greedy(work: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = _chat_client(work)
    run = work / "outputs" / "r"
    got = _chat(client, {"target": "outputs/r", "system": SYSTEM, "messages": MESSAGES, "max_tokens": 16,
                         "compare": True})
    assert got["model"]["end"].get("done") and got["base"]["end"].get("done"), got
    import yaml

    base_path = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["resolved"]["model_path"]
    tok = AutoTokenizer.from_pretrained(base_path)
    template = (run / "chat_template.jinja").read_text(encoding="utf-8")
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *MESSAGES], chat_template=template,
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def greedy(model: Any) -> str:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 do_sample=False, eos_token_id=[tok.eos_token_id, im_end], pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    want_base = greedy(base)
    tuned = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    want_tuned = greedy(tuned)
    assert want_tuned != want_base  # the adapter changes the answer, so the sides are told apart
    assert got["model"]["text"] == want_tuned
    assert got["base"]["text"] == want_base


@pytest.mark.slow
def test_chat_with_an_mlx_run_answers_on_its_worker_thread_as_on_the_main_thread(work: Path, tmp_path: Path) -> None:
    """MLX streams are per thread: the studio loads and generates on the model's own worker thread,
    and must answer exactly as `qlocal chat` does on the main thread."""
    pytest.importorskip("mlx_lm")
    from infer_helpers import lively_model, synthetic_run

    from qlocal.infer import Sampling, open_generator

    run = synthetic_run(tmp_path, lively_model(tmp_path, "qwen2"), backend="mlx")
    shutil.copytree(run, work / "outputs" / "m")
    got = _chat(_chat_client(work), {"target": "outputs/m", "messages": MESSAGES, "max_tokens": 12})
    assert got["model"]["end"].get("done"), got
    ref = "".join(open_generator(str(work / "outputs" / "m"), "mlx").chat(MESSAGES, Sampling(max_tokens=12)))
    assert got["model"]["text"] == ref and ref.strip()


_CLIENTS: dict[str, Any] = {}


def _chat_client(root: Path) -> Any:
    # one app per folder for the module: its loaded models are what a studio keeps between requests
    if str(root) not in _CLIENTS:
        _CLIENTS[str(root)] = _client(root)
    return _CLIENTS[str(root)]
