"""Background qlocal commands started from the studio: an argv list (never a shell), a log, a
status, SIGINT to stop (what Ctrl-C does: `qlocal train` checkpoints and exits 130).

Each job keeps its record under <root>/.qlocal-studio/jobs/<id>/ (job.json, log.txt, rc), so a
restarted studio still knows what it started. Jobs run in their own session: stopping the studio
does not stop them, and a Stop reaches the job's whole process group as Ctrl-C would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qlocal import atomic, pidfile

# The only subcommands a browser can have the studio start.
ALLOWED_COMMANDS = ("train", "export", "eval")
STOPPED_EXIT = 130  # qlocal's exit status after Ctrl-C (train: after its checkpoint)


class JobRefused(ValueError):
    """A job the runner will not start (not a qlocal command, bad argument, run already busy)."""


@dataclass
class Job:
    """One background qlocal command."""

    id: str
    folder: Path
    args: list[str]  # after `qlocal`: ["train", "--set", "model.name=..."]
    run: str | None  # the run folder it works on, relative to root (for the Runs table)
    started: float
    pid: int
    proc_start: str | None = None  # /proc start time: tells a live pid from a reused one

    @property
    def kind(self) -> str:
        return self.args[0]

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"

    def returncode(self) -> int | None:
        """The exit status once it has ended (None while running or when it vanished unrecorded)."""
        rc = self.folder / "rc"
        return int(rc.read_text()) if rc.is_file() else None

    def stop_requested(self) -> bool:
        return (self.folder / "stop").is_file()

    def alive(self) -> bool:
        if self.returncode() is not None:
            return False
        return _pid_alive(self.pid, self.proc_start, self.started)

    def status(self) -> str:
        """running | finished | stopped | failed."""
        if self.alive():
            return "running"
        rc = self.returncode()
        if rc == 0:
            return "finished"
        if rc == STOPPED_EXIT or (rc is None and self.stop_requested()):
            return "stopped"
        return "failed"

    def log_tail(self, max_bytes: int = 16000) -> str:
        """The end of its log, tqdm's carriage-return redraws collapsed to their last state."""
        if not self.log.is_file():
            return ""
        with self.log.open("rb") as f:
            f.seek(max(0, self.log.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "kind": self.kind, "args": self.args, "run": self.run, "started": self.started,
                "pid": self.pid, "status": self.status(), "returncode": self.returncode()}


def _proc_start(pid: int) -> str | None:
    try:
        stat = (pidfile.PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def _pid_alive(pid: int, proc_start: str | None, launched: float) -> bool:
    """Whether the job's process still runs: its pid is alive and not reused. /proc's start ticks
    say that exactly; elsewhere (macOS) the pid's process must have started by the job's launch time."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if proc_start is not None and pidfile.PROC.is_dir():
        return _proc_start(pid) == proc_start
    started = pidfile.process_start(pid)
    return started is None or started <= launched + 2.0  # start times are whole seconds


def check_args(args: list[str]) -> None:
    """Refuse anything but one of qlocal's own subcommands with plain string arguments."""
    if not args or args[0] not in ALLOWED_COMMANDS:
        raise JobRefused(f"only qlocal {', '.join(ALLOWED_COMMANDS)} can be started, not {args[:1]}")
    for a in args:
        if not isinstance(a, str) or "\x00" in a or "\n" in a or "\r" in a:
            raise JobRefused(f"argument {a!r}: not a plain one-line string")


class JobRunner:
    """Starts, lists and stops the studio's background qlocal commands."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.dir = self.root / ".qlocal-studio" / "jobs"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def start(self, args: list[str], run: str | None = None) -> Job:
        """`python -m qlocal <args>` in the background, cwd = root, output into the job's log."""
        check_args(args)
        with self._lock:
            if run is not None and (busy := self.active_for(run)) is not None:
                raise JobRefused(f"{run}: already has a running job ({busy.kind}, {busy.id}); stop it first")
            job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 1000:03d}{len(self._procs):03d}{os.urandom(2).hex()}"
            folder = self.dir / job_id
            folder.mkdir(parents=True)
            # The job runs the same qlocal as this studio, whatever the cwd or install.
            here = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
            with (folder / "log.txt").open("wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "qlocal", *args], cwd=self.root, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
            job = Job(job_id, folder, list(args), run, time.time(), proc.pid, _proc_start(proc.pid))
            record = {k: v for k, v in asdict(job).items() if k != "folder"}
            atomic.write_text(folder / "job.json", json.dumps(record, indent=1))
            self._procs[job_id] = proc
        threading.Thread(target=self._reap, args=(job, proc), daemon=True).start()
        return job

    def _reap(self, job: Job, proc: subprocess.Popen[bytes]) -> None:
        # Wait without reaping, record rc, then reap: the pid stays alive (a zombie) until rc
        # exists, so a job never reads as ended-without-status in between.
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            rc = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        except (AttributeError, OSError):
            rc = proc.wait()
        atomic.write_text(job.folder / "rc", str(rc))
        proc.wait()
        with self._lock:
            self._procs.pop(job.id, None)

    def get(self, job_id: str) -> Job | None:
        """The job of that id, or None (ids come from the browser: only names in the jobs folder match)."""
        if not self.dir.is_dir() or job_id not in {p.name for p in self.dir.iterdir()}:
            return None
        folder = self.dir / job_id
        try:
            rec = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return Job(folder=folder, **rec)

    def list(self) -> list[Job]:
        """Every recorded job, newest first."""
        if not self.dir.is_dir():
            return []
        jobs = [j for p in self.dir.iterdir() if (j := self.get(p.name)) is not None]
        return sorted(jobs, key=lambda j: (j.started, j.id), reverse=True)

    def for_run(self, run: str) -> list[Job]:
        """The jobs that worked on `run`, newest first."""
        return [j for j in self.list() if j.run == run]

    def active_for(self, run: str) -> Job | None:
        return next((j for j in self.for_run(run) if j.alive()), None)

    def stop(self, job_id: str) -> Job:
        """SIGINT to the job's process group, as Ctrl-C in its terminal would; once per job: a second
        Stop (a double click) would be the second Ctrl-C, which aborts train mid-step."""
        job = self.get(job_id)
        if job is None:
            raise JobRefused(f"no job {job_id!r}")
        if job.alive() and not job.stop_requested():
            atomic.write_text(job.folder / "stop", str(time.time()))
            try:
                os.killpg(job.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> int | None:
        """Block until a job this runner started has exited; its status (None on timeout)."""
        job = self.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while job is not None and job.returncode() is None and job.alive():
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.05)  # poll interval: the reaper thread writes rc
        return job.returncode() if job else None
