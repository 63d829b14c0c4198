"""Search the NSR weight lambda (and friends) with NNI, the way the paper chose it.

    python -m nsr search configs/nni/mlp4.yml
    python -m nsr search configs/nni/mlp4.yml --max-trials 2 --trial-args "--dataset digits --epochs 1"

Loads an NNI v2 experiment config (configs/nni/*.yml), checks it (search space included) before
anything starts, starts the experiment with NNI's Python API, prints each finished trial and the
best one so far, waits for the end, then prints the best parameters with their validation and test
accuracy and writes OUT/best.json (plus OUT/trials.json, every trial). The NNI manager and its
trials end with the launcher on every exit path: normal end, error, a dead tuner, Ctrl-C, SIGTERM,
and SIGKILL (a watchdog process). The web UI listens on 127.0.0.1 only (`--host 0.0.0.0`: NNI's
default, every interface).

This file is the launcher; what it does around NNI 3.0's gaps is in nsr/nni_workarounds.py.
The tuner maximises the trials' "default" metric, the best validation accuracy; the test accuracy
only rides along (see nsr/search/trial.py).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nsr.train.errors import ArgumentParser, UserError, one_line, run_cli
from nsr.train.fileio import write_json

from . import workarounds as nw
from .nni_config import field, load_config

TERMINAL = ("SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED")
DEFAULT_PORT = 8080
NO_TRIAL_NOTE_S = 90  # say why when no trial has started by then
LOST_CONTACT_POLLS = 5  # failed status requests in a row before the manager counts as gone


# ---------------------------------------------------------------------------------------------
# port and environment

def _port_in_use(port: int) -> bool:
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex((addr, port)) == 0:
                    return True
        except OSError:
            continue
    return False


def pick_port(requested: int, host: str) -> int:
    if requested == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if not 1 <= requested <= 65535:
        raise UserError(f"--port must be between 1 and 65535 (0 picks a free one), got {requested}")
    if _port_in_use(requested):
        raise UserError(f"port {requested} is in use (another NNI experiment?); "
                        "pick another with --port, or --port 0 for any free one")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as Node.js does when the manager listens: a connection of the previous search still in
        # TIME_WAIT on this port does not make it busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, requested))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{requested}: {e.strerror or e}; "
                            "pick another with --port") from None
    return requested


def prepare_environment(host: str, workdir: Path) -> None:
    """Environment the NNI manager (and through it every trial) inherits."""
    # Trials run `python3 ...` through bash: make it this interpreter, venv activated or not.
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir and bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")
    nw.bypass_proxy_for_localhost()
    nw.listen_on_loopback(host, workdir)


# ---------------------------------------------------------------------------------------------
# trials

def _metric(job) -> tuple[float | None, float | None]:
    if not job.finalMetricData:
        return None, None
    data = job.finalMetricData[-1].data
    if isinstance(data, dict):
        val, test = data.get("default"), data.get("test_acc")
    else:
        val, test = data, None
    val = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else None
    test = float(test) if isinstance(test, (int, float)) and math.isfinite(test) else None
    return val, test


def trial_record(job) -> dict[str, Any]:
    val, test = _metric(job)
    params = job.hyperParameters[-1].parameters if job.hyperParameters else {}
    return {"trial_id": job.trialJobId, "sequence": job.sequenceId, "status": job.status,
            "parameters": params, "best_val_acc": val, "test_acc": test}


def _fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts) or "(no parameters)"


def _trial_dir(exp_dir: Path, trial_id: str) -> Path | None:
    for d in exp_dir.glob(f"environments/*/trials/{trial_id}"):
        return d
    return None


def _last_error_line(exp_dir: Path, trial_id: str) -> str:
    d = _trial_dir(exp_dir, trial_id)
    if d is None:
        return ""
    try:
        lines = [ln.strip() for ln in (d / "trial.stderr").read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    return lines[-1] if lines else ""


def best_of(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in records if r["status"] == "SUCCEEDED" and r["best_val_acc"] is not None]
    return max(done, key=lambda r: (r["best_val_acc"], -r["sequence"])) if done else None


# ---------------------------------------------------------------------------------------------
# experiment

def _prepare(args: argparse.Namespace):
    """Everything that can be checked before NNI starts: (config, port, output folder)."""
    nw.silence_stdout_log()
    nw.shorten_rest_timeout()
    nw.require_filelock_below_3_12()
    config = load_config(args.config, args)
    nw.check_gpus(config, args.config)
    port = pick_port(args.port, args.host)
    out = Path(args.out) if args.out else Path("runs") / "nni" / Path(args.config).stem
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "best.json").unlink(missing_ok=True)  # never leave an older search's answer behind
    except OSError as e:
        raise UserError(f"cannot write to --out {str(out)!r}: {e.strerror or e}") from None
    return config, port, out


def _gpu_note(config) -> str:
    ts = config.training_service
    return (f"trialGpuNumber {field(config, 'trial_gpu_number')}, gpuIndices {ts.gpu_indices}, "
            f"useActiveGpu {ts.use_active_gpu}")


def _ignore_interrupts(ignore: bool) -> None:
    """While stopping, no second Ctrl-C or SIGTERM may cut the clean-up short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN if ignore else signal.default_int_handler)


def _run_experiment(exp, exp_dir: Path, records: dict[str, dict[str, Any]], args: argparse.Namespace,
                    port: int, gpu_note: str) -> tuple[str, list[str]]:
    """Start the experiment, wait for its end, stop it: (status, NNI's errors). The status is
    INTERRUPTED after Ctrl-C or SIGTERM; the manager and its trials are gone on return."""
    from nni.experiment import RunMode

    watchdog = nw.start_watchdog(exp.id)  # first: a kill -9 while NNI starts is covered too
    try:
        try:
            # Detach: the manager's and the tuner's own output go to log/nnictl_std*.log, not
            # to our terminal; stop_experiment ends it on every path all the same.
            exp.start(port, debug=False, run_mode=RunMode.Detach)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise UserError(f"NNI manager did not start: {one_line(e)} "
                            f"(log: {exp_dir / 'log'})") from None
        url_host = "127.0.0.1" if args.host == "0.0.0.0" else args.host
        print(f"web UI: http://{url_host}:{port}  (NNI files: {exp_dir})", flush=True)
        return _wait(exp, exp_dir, records, args.poll, gpu_note)
    except KeyboardInterrupt:
        _ignore_interrupts(True)
        print("\ninterrupted: stopping the experiment ...", file=sys.stderr, flush=True)
        try:
            _refresh(exp, exp_dir, records, quiet=True)  # one last look before the manager goes
        except Exception:
            pass
        return "INTERRUPTED", []
    finally:
        _ignore_interrupts(True)
        nw.stop_experiment(exp)
        watchdog.terminate()
        watchdog.wait()
        _ignore_interrupts(False)


def run_search(args: argparse.Namespace) -> int:
    config, port, out = _prepare(args)
    from nni.experiment import Experiment

    workdir = Path(tempfile.mkdtemp(prefix="nsr-search-"))
    prepare_environment(args.host, workdir)
    exp = Experiment(config)
    exp_root = Path(config.canonical_copy().experiment_working_directory)
    exp_dir = exp_root / exp.id
    print(f"experiment {exp.id}: {args.config}, up to {config.max_trial_number or 'unlimited'} trials"
          f"{', ' + str(config.max_experiment_duration) if config.max_experiment_duration else ''}")
    print(f"trial command: {field(config, 'trial_command')}", flush=True)
    records: dict[str, dict[str, Any]] = {}
    started = time.time()
    try:
        status, errors = _run_experiment(exp, exp_dir, records, args, port, _gpu_note(config))
    finally:
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()

    if status == "INTERRUPTED":
        for rec in records.values():
            if rec["status"] not in TERMINAL:
                rec["status"] = "INTERRUPTED"  # the manager cancelled it on the way out
    trials = sorted(records.values(), key=lambda r: r["sequence"])
    write_json(out / "trials.json", {"experiment_id": exp.id, "config": args.config,
                                     "status": status, "trials": trials})
    n_ok = sum(r["status"] == "SUCCEEDED" for r in trials)
    n_failed = sum(r["status"] == "FAILED" for r in trials)
    print(f"experiment {exp.id} {status.lower()} after {time.time() - started:.0f} s: "
          f"{n_ok} trial(s) succeeded, {n_failed} failed, {len(trials)} in all", flush=True)
    best = best_of(trials)
    if best is None:
        if status == "INTERRUPTED":
            return 130
        if errors:
            raise UserError(errors[0])
        raise UserError(f"no trial succeeded; see the trial logs under {exp_dir / 'environments'}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    _write_best(out, best, exp, exp_dir, config, args.config, trials, status)
    print(f"to browse it again: nnictl view {exp.id} --experiment_dir {exp_root} --port {port}")
    return 130 if status == "INTERRUPTED" else 1 if status == "ERROR" else 0


def _write_best(out: Path, best: dict[str, Any], exp, exp_dir: Path, config, config_path: str,
                trials: list[dict[str, Any]], status: str) -> None:
    result = {
        "experiment_id": exp.id,
        "trial_id": best["trial_id"],
        "parameters": best["parameters"],
        "best_val_acc": best["best_val_acc"],
        "test_acc": best["test_acc"],
        "config": config_path,
        "trial_command": field(config, "trial_command"),
        "trials_succeeded": sum(r["status"] == "SUCCEEDED" for r in trials),
        "trials_failed": sum(r["status"] == "FAILED" for r in trials),
        "trials_total": len(trials),
        "complete": status == "DONE",
        "trial_dir": str(_trial_dir(exp_dir, best["trial_id"]) or ""),
        "experiment_dir": str(exp_dir),
    }
    write_json(out / "best.json", result)
    test = f"{best['test_acc']:.2f} %" if best["test_acc"] is not None else "n/a"
    lam = best["parameters"].get("lambda")
    head = f"best lambda = {lam:.6g}" if isinstance(lam, (int, float)) else "best parameters"
    print(f"{head} ({_fmt_params(best['parameters'])}; trial {best['trial_id']}): "
          f"validation {best['best_val_acc']:.2f} %, test {test}")
    print(f"wrote {out / 'best.json'}")


def _refresh(exp, exp_dir: Path, records: dict[str, dict[str, Any]], quiet: bool = False) -> None:
    for job in exp.list_trial_jobs():
        rec = trial_record(job)
        old = records.get(rec["trial_id"])
        if rec["status"] == "FAILED":
            rec["error"] = (old or {}).get("error") or _last_error_line(exp_dir, rec["trial_id"])
        records[rec["trial_id"]] = rec
        if quiet or rec["status"] not in TERMINAL or (old and old["status"] == rec["status"]):
            continue
        done = sum(r["status"] in TERMINAL for r in records.values())
        line = f"[{done} done] trial {rec['trial_id']} {rec['status']}: {_fmt_params(rec['parameters'])}"
        if rec["best_val_acc"] is not None:
            test = f", test {rec['test_acc']:.2f} %" if rec["test_acc"] is not None else ""
            line += f" -> validation {rec['best_val_acc']:.2f} %{test}"
        if rec.get("error"):
            line += f" ({rec['error']})"
        best = best_of(list(records.values()))
        if best is not None:
            line += f" | best so far {best['best_val_acc']:.2f} % ({_fmt_params(best['parameters'])})"
        print(line, flush=True)


def _manager_errors(check: dict, exp_dir: Path) -> list[str]:
    errs = [" ".join(str(e.get("message", e) if isinstance(e, dict) else e).split())
            for e in check.get("errors") or []] or ["the experiment stopped with an error"]
    return [f"NNI: {e} (log: {exp_dir / 'log'})" for e in errs]


def _wait(exp, exp_dir: Path, records: dict[str, dict[str, Any]], poll: float,
          gpu_note: str = "") -> tuple[str, list[str]]:
    """Poll the manager until the experiment ends: (status, errors)."""
    from nni.experiment import rest

    failures = 0
    started = time.time()
    noted = False
    while True:
        try:
            check = rest.get(exp.port, "/check-status", exp.url_prefix) or {}  # status and errors
            status = check.get("status", "UNKNOWN")
            _refresh(exp, exp_dir, records)
            failures = 0
        except Exception as e:  # the manager went away or hiccuped
            failures += 1
            if failures >= LOST_CONTACT_POLLS:
                return "ERROR", [f"lost contact with the NNI manager: {one_line(e)}"]
            time.sleep(poll)
            continue
        tuner_error = nw.dead_tuner_error(exp_dir)
        if tuner_error:
            return "ERROR", [f"NNI's tuner stopped: {tuner_error} "
                             f"(log: {exp_dir / 'log' / 'dispatcher.log'})"]
        if status in ("DONE", "STOPPED"):
            return status, []
        if status == "ERROR":
            return status, _manager_errors(check, exp_dir)
        active = any(r["status"] in ("WAITING", "RUNNING", "UNKNOWN") for r in records.values())
        if status == "TUNER_NO_MORE_TRIAL" and not active:
            return "DONE", []
        if not noted and time.time() - started > NO_TRIAL_NOTE_S and not any(
                r["status"] != "WAITING" for r in records.values()):
            print(nw.no_trial_note(exp_dir, gpu_note), file=sys.stderr, flush=True)
            noted = True
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m nsr search",
        description="Run an NNI search (configs/nni/*.yml) to its end and report the best trial.")
    p.add_argument("config", help="NNI v2 experiment config, e.g. configs/nni/mlp4.yml")
    p.add_argument("--max-trials", type=int, metavar="N", help="override maxTrialNumber")
    p.add_argument("--concurrency", type=int, metavar="N",
                   help="override trialConcurrency: trials trained at once (e.g. 2 on 2 CPU cores)")
    p.add_argument("--max-duration", metavar="TIME", help="override maxExperimentDuration (e.g. 2h, 30m)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"web UI / NNI manager port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0"],
                   help="address the web UI listens on (default 127.0.0.1: this machine only)")
    p.add_argument("--out", metavar="DIR", help="where best.json and trials.json go "
                   "(default runs/nni/<config name>)")
    p.add_argument("--trial-args", default="", metavar="ARGS",
                   help='extra options appended to every trial command, e.g. "--dataset digits --epochs 1"')
    p.add_argument("--experiment-dir", metavar="DIR",
                   help="NNI's experiment working directory (default from the config: ~/nni-experiments)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu-indices", metavar="LIST",
                     help="GPUs trials may use, e.g. 0 or 0,1 (sets trainingService.gpuIndices; "
                          "trialGpuNumber becomes 1 when unset)")
    gpu.add_argument("--cpu", action="store_true", help="train every trial on the CPU (trialGpuNumber 0)")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_trials is not None and args.max_trials < 1:
        parser.error(f"--max-trials must be at least 1, got {args.max_trials}")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.poll <= 0:
        parser.error("--poll must be positive")
    # Ctrl-C must reach us even when started with SIGINT ignored (e.g. from a `&` job); SIGTERM
    # and SIGHUP stop the search the same way.
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, signal.default_int_handler)
    return run_search(args)


if __name__ == "__main__":
    run_cli(main)
