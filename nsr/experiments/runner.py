"""Planned training runs (Variant, Run) and running them as subprocesses, --jobs at a time, with
progress lines and logs (the `run` step of python -m nsr reproduce and python -m nsr compare)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nsr.train.errors import UserError

from . import report


@dataclass(frozen=True)
class Variant:
    name: str                      # folder under OUT/<model>/ and row label in the table
    flags: tuple[str, ...] = ()    # training flags, after the config's and --lambda-from's
    nsr: bool = True               # --regularizer nsr / none; --lambda-from applies to NSR variants



@dataclass
class Run:
    model: str
    variant: Variant
    seed: int
    folder: Path
    command: list[str]
    state: str = "new"   # new | finished | resumable | stale

    @property
    def label(self) -> str:
        return f"{self.model} {self.variant.name:<7} seed {self.seed}"


def _hms(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Thread-safe progress lines: [done/total elapsed, ETA from the mean time of trained runs]."""

    def __init__(self, total: int, to_train: int, jobs: int):
        self.total, self.to_train, self.jobs = total, to_train, max(1, jobs)
        self.done = self.trained = 0
        self.train_time = 0.0
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def line(self, text: str, done: bool = False, trained_for: float | None = None) -> None:
        with self.lock:
            self.done += done
            if trained_for is not None:
                self.trained += 1
                self.train_time += trained_for
            eta = ""
            if self.trained and self.to_train > self.trained:
                left = self.train_time / self.trained * (self.to_train - self.trained) / self.jobs
                eta = f", ETA {_hms(left)}"
            elapsed = _hms(time.monotonic() - self.start)
            print(f"[{self.done}/{self.total} {elapsed}{eta}] {text}", flush=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-lines:])
    except OSError:
        return ""


def execute(run: Run, log_dir: Path, progress: Progress, env: dict, running: set) -> str | None:
    """Train one run as a subprocess in this process's working folder (so that relative paths in
    configs mean what they mean for the scripts); None when it finished, else why it failed.
    The process sits in `running` while it trains."""
    stem = log_dir / f"{run.model}-{run.variant.name}-seed{run.seed}"
    out_log, err_log = stem.with_suffix(".stdout.log"), stem.with_suffix(".stderr.log")
    how = {"resumable": "resuming", "stale": "restarting"}.get(run.state, "training")
    progress.line(f"{run.label}: {how}")
    start = time.monotonic()
    # Logs are streamed while the run trains, so they are written in place, not atomically.
    with open(out_log, "w") as fo, open(err_log, "w") as fe:
        fo.write("$ " + shlex.join(run.command) + "\n")
        fo.flush()
        try:
            process = subprocess.Popen(run.command, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            rc = -1
            fe.write(f"{e}\n")
        else:
            running.add(process)
            try:
                rc = process.wait()
            finally:
                running.discard(process)
    took = time.monotonic() - start
    try:
        metrics = report.read_metrics(run.folder) or {}
    except UserError:
        metrics = {}
    # --max-steps (say, in --extra for a smoke run) ends a run early by request: done, not failed
    stopped = metrics.get("stopped_by") == "max_steps"
    if rc == 0 and (metrics.get("finished") is True or stopped):
        err = metrics.get("test_error")
        shown = f", test error {err:.2f}%" if isinstance(err, (int, float)) else ""
        shown += " (stopped by --max-steps)" if stopped else ""
        progress.line(f"{run.label}: done in {_hms(took)}{shown}", done=True, trained_for=took)
        return None
    why = f"exit code {rc}" if rc != 0 else "exited 0 but metrics.json is not marked finished"
    tail = _tail(err_log) or _tail(out_log)
    progress.line(f"{run.label}: FAILED ({why}) after {_hms(took)}; command: "
                  f"{shlex.join(run.command)}\n  log: {err_log}\n"
                  + "\n".join("  | " + line for line in tail.splitlines()), done=True, trained_for=took)
    last = tail.splitlines()[-1] if tail else ""
    return f"{run.label}: {why}: {last}\n    log: {err_log}"


def run_all(runs: list[Run], log_dir: Path, jobs: int, fail_fast: bool = False) -> list[str]:
    """Train every run not finished; one message per failed run. fail_fast: after the first
    failure start no further run (runs in flight finish)."""
    pending = [r for r in runs if r.state != "finished"]
    progress = Progress(len(runs), len(pending), min(jobs, max(1, len(pending))))
    for r in runs:
        if r.state == "finished":
            progress.line(f"{r.label}: skipped (finished)", done=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # jobs share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    log_dir.mkdir(parents=True, exist_ok=True)
    stopped: list[str] = []  # why no further run starts, once one of the reasons holds
    running: set[subprocess.Popen] = set()

    def one(run: Run) -> str | None:
        if stopped:
            progress.line(f"{run.label}: not started ({stopped[0]})", done=True)
            return None
        failure = execute(run, log_dir, progress, env, running)
        if failure and fail_fast:
            stopped.append("--fail-fast")
        return failure

    pool = ThreadPoolExecutor(max_workers=jobs)
    saved = stop_on_signals()
    try:
        return [f for f in pool.map(one, pending) if f]
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM of this command (a `kill`, a cluster's warning): queued runs never
        # start, and each run in flight is stopped the way a training script stops on SIGTERM
        # (last.pt saved at its step, so the same command resumes it) and waited for. Without
        # this a run started in the background, or whose parent alone was signalled, trained on.
        stopped.insert(0, "interrupted")
        for process in list(running):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def stop_on_signals() -> dict:
    """SIGINT and SIGTERM raise KeyboardInterrupt in this (main) thread, even when the command was
    started with SIGINT ignored (a `&` job of a script); returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, signal.default_int_handler)
    return saved


def print_failures(failures: list[str], total: int | None = None) -> int:
    """List the failed runs on stderr; the exit status: 1 if any failed, else 0."""
    if not failures:
        return 0
    of = f" of {total}" if total is not None else ""
    print(f"\n{len(failures)}{of} runs failed (details above):", file=sys.stderr)
    for msg in failures:
        print(msg, file=sys.stderr)
    return 1
