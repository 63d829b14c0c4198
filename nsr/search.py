"""Search the NSR weight lambda (and friends) with NNI, the way the paper chose it.

    python -m nsr.search configs/nni/mlp4.yml
    python -m nsr.search configs/nni/mlp4.yml --max-trials 2 --trial-args "--dataset digits --epochs 1"

Loads an NNI v2 experiment config (configs/nni/*.yml), starts the experiment with NNI's Python
API, prints each finished trial and the best one so far, waits for the end, then prints the best
parameters with their validation and test accuracy and writes OUT/best.json (plus OUT/trials.json,
every trial). The NNI manager is stopped on every exit path: normal end, error, Ctrl-C, SIGTERM.

The web UI (and NNI's REST API) listens on 127.0.0.1 only; NNI 3.0 has no option for that, so
the manager's Node.js process is started with a small preload (NODE_OPTIONS=--require) that gives
servers started without a host the loopback address. `--host 0.0.0.0` restores NNI's default.

The tuner maximises the trials' "default" metric, the best validation accuracy; the test accuracy
only rides along (see nsr/nni_trial.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TERMINAL = ("SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED")
DEFAULT_PORT = 8080
NO_TRIAL_NOTE_S = 90  # say why when no trial has started by then
GRACEFUL_STOP_S = 30  # NNI stops trials with SIGINT, then SIGKILL after 5 s
REST_TIMEOUT_S = 10   # NNI's default, 20 s a request, makes a hung manager slow to give up on

# Node.js preload for the NNI manager: a server started with only a port listens on HOST.
_LOOPBACK_JS = r"""'use strict';
// Written by nsr.search: NNI 3.0 listens on every interface and has no option to change it.
const net = require('net');
const host = process.env.NSR_NNI_LISTEN_HOST || '127.0.0.1';
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const a = args[0];
  if (typeof a === 'number' || (typeof a === 'string' && /^\d+$/.test(a))) {
    if (args.length === 1 || typeof args[1] === 'function') args.splice(1, 0, host);
  } else if (a && typeof a === 'object' && a.path === undefined && a.host === undefined && a.port !== undefined) {
    args[0] = Object.assign({}, a, { host });
  }
  return listen.apply(this, args);
};
"""


class SearchError(Exception):
    """A problem the user can fix; printed as one `error: ...` line."""


class _Terminated(BaseException):
    """SIGTERM/SIGHUP, handled like Ctrl-C."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# config

def load_config(path: str, args: argparse.Namespace):
    """ExperimentConfig from the YAML file, with the command line's overrides applied and checked."""
    import yaml
    from nni.experiment.config import ExperimentConfig

    p = Path(path)
    if not p.is_file():
        raise SearchError(f"NNI config {path!r} not found; pass one of configs/nni/*.yml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SearchError(f"NNI config {path!r} is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or _one_line(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SearchError(f"cannot read NNI config {path!r}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise SearchError(f"NNI config {path!r} must be a mapping (NNI's v2 experiment config)")
    if "trainingServicePlatform" in data:
        raise SearchError(f"NNI config {path!r} is in NNI's legacy v1 format; use the v2 format "
                          "of configs/nni/*.yml")
    try:
        # load() resolves relative paths (trialCodeDirectory) against the YAML file's folder.
        config = ExperimentConfig.load(str(p))
    except Exception as e:  # NNI raises assorted types for unknown or mistyped fields
        raise SearchError(f"NNI config {path!r}: {_one_line(e)}") from None

    if args.max_trials is not None:
        config.max_trial_number = args.max_trials
    if args.max_duration is not None:
        config.max_experiment_duration = args.max_duration
    if args.experiment_dir is not None:
        config.experiment_working_directory = str(Path(args.experiment_dir).expanduser().resolve())
    platform = getattr(config.training_service, "platform", None)  # None: missing, or a list
    if platform is None and not isinstance(config.training_service, list):
        raise SearchError(f"NNI config {path!r} has no trainingService; add "
                          "`trainingService: {platform: local}`")
    if platform != "local":
        raise SearchError(f"NNI config {path!r}: nsr.search runs the local training service only; "
                          "use nnictl for other platforms")
    command = _field(config, "trial_command")
    if not command:
        raise SearchError(f"NNI config {path!r} has no trialCommand")
    if args.trial_args:
        try:
            extra = shlex.split(args.trial_args)
        except ValueError as e:
            raise SearchError(f"--trial-args {args.trial_args!r}: {e}") from None
        _set_field(config, "trial_command", f"{command} {shlex.join(extra)}")
    _apply_gpu_options(config, args)
    try:
        config.validate()
    except Exception as e:
        raise SearchError(f"NNI config {path!r}: {_one_line(e)}") from None
    return config


def _field(config, name: str):
    """A training-service field, set either under trainingService or at the top level."""
    from nni.experiment.config.utils import is_missing

    value = getattr(config.training_service, name, None)
    if value is None or is_missing(value):
        value = getattr(config, name, None)
    return None if is_missing(value) else value


def _set_field(config, name: str, value) -> None:
    setattr(config, name, value)
    setattr(config.training_service, name, value)


def _parse_gpu_indices(text: str) -> list[int]:
    try:
        indices = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        indices = []
    if not indices or any(i < 0 for i in indices):
        raise SearchError(f"--gpu-indices expects GPU numbers like 0 or 0,1; got {text!r}")
    return indices


def _apply_gpu_options(config, args: argparse.Namespace) -> None:
    ts = config.training_service
    if args.cpu:
        # trialGpuNumber 0: NNI sets CUDA_VISIBLE_DEVICES="" for the trial, so it trains on CPU.
        _set_field(config, "trial_gpu_number", 0)
        ts.gpu_indices = None
    elif args.gpu_indices is not None:
        indices = _parse_gpu_indices(args.gpu_indices)
        _set_field(config, "trial_gpu_number", _field(config, "trial_gpu_number") or 1)
        ts.gpu_indices = indices
        if ts.use_active_gpu is None:
            ts.use_active_gpu = True


def _visible_gpu_count() -> int | None:
    """NVIDIA GPUs NNI's scheduler can see (it uses NVML too); None when NVML is unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def check_filelock() -> None:
    """NNI 3.0 pins filelock<3.12: with a newer one its experiment registry lock never acquires
    and starting an experiment hangs for ever (nnictl too). Say so instead of hanging."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("filelock")
    except PackageNotFoundError:
        return
    parts = []
    for piece in found.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) >= (3, 12):
        raise SearchError(f"filelock {found} is installed, but NNI 3.0 needs filelock<3.12 (with a "
                          "newer one it hangs while starting); run: pip install 'filelock<3.12'")


def _gpu_note(config) -> str:
    ts = config.training_service
    return (f"trialGpuNumber {_field(config, 'trial_gpu_number')}, gpuIndices {ts.gpu_indices}, "
            f"useActiveGpu {ts.use_active_gpu}")


def check_gpus(config, config_path: str) -> None:
    """Fail fast where NNI would wait forever for a GPU that is not there."""
    canon = config.canonical_copy()
    ts = canon.training_service
    need = ts.trial_gpu_number or 0
    if need <= 0:
        return
    count = _visible_gpu_count()
    if count is None:
        return  # cannot tell; let NNI schedule
    if count == 0:
        raise SearchError(f"{config_path} asks for {need} GPU per trial (trialGpuNumber) but no "
                          "NVIDIA GPU is visible; add --cpu to train on the CPU")
    bad = [i for i in (ts.gpu_indices or []) if i >= count]
    if bad:
        raise SearchError(f"GPU index {bad[0]} does not exist: {count} GPU(s) visible "
                          f"(0..{count - 1}); fix --gpu-indices or trainingService.gpuIndices")
    usable = len(ts.gpu_indices) if ts.gpu_indices else count
    if need > usable:
        raise SearchError(f"trialGpuNumber is {need} but only {usable} GPU(s) can be used")


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
        raise SearchError(f"--port must be between 1 and 65535 (0 picks a free one), got {requested}")
    if _port_in_use(requested):
        raise SearchError(f"port {requested} is in use (another NNI experiment?); "
                          "pick another with --port, or --port 0 for any free one")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, requested))
        except OSError as e:
            raise SearchError(f"cannot listen on {host}:{requested}: {e.strerror or e}; "
                              "pick another with --port") from None
    return requested


def prepare_environment(host: str, workdir: Path) -> None:
    """Environment the NNI manager (and through it every trial) inherits."""
    # Trials run `python3 ...` through bash: make it this interpreter, venv activated or not.
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir and bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")
    # NNI's clients talk to http://localhost:PORT; never send that through an HTTP proxy.
    no_proxy = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
    for h in ("localhost", "127.0.0.1", "::1"):
        if h not in no_proxy:
            no_proxy.append(h)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(no_proxy)
    if host != "0.0.0.0":
        preload = workdir / "nsr_listen_loopback.js"
        preload.write_text(_LOOPBACK_JS, encoding="utf-8")
        os.environ["NSR_NNI_LISTEN_HOST"] = host
        opts = os.environ.get("NODE_OPTIONS", "")
        os.environ["NODE_OPTIONS"] = f"{opts} --require {json.dumps(str(preload))}".strip()


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

def _group_members(pgid: int) -> list:
    """Live (non-zombie) processes of a process group."""
    import psutil

    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _managers_of(exp_id: str) -> list:
    """NNI manager processes started for this experiment id (found by their command line)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "--experiment-id" in cmd and exp_id in cmd:
            found.append(p)
    return found


def _stop_experiment(exp) -> None:
    """Stop the NNI manager gracefully; then end whatever is left of its process group."""
    import atexit

    import psutil

    atexit.unregister(exp.stop)
    proc = exp._proc
    pgids = {proc.pid} if proc is not None else set()
    # Ctrl-C while the manager was starting can leave it running unknown to `exp`.
    pgids |= {p.pid for p in _managers_of(exp.id)}
    if proc is not None:
        t = threading.Thread(target=exp.stop, daemon=True)  # DELETE /experiment, then wait
        t.start()
        t.join(GRACEFUL_STOP_S)
    # The manager was started with setpgrp: its group holds the tuner and the trials.
    for pgid in pgids:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            members = _group_members(pgid)
            if not members:
                break
            for p in members:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(members, timeout=5)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except Exception:
            pass


def run_search(args: argparse.Namespace) -> int:
    config_path = args.config
    # importing nni registers its stdout log handler: silence it, its log file keeps everything
    import nni.runtime.log as nni_log
    from nni.experiment import Experiment, RunMode

    nni_log.silence_stdout()
    import nni.experiment.rest as nni_rest

    nni_rest.timeout = REST_TIMEOUT_S
    check_filelock()
    config = load_config(config_path, args)
    check_gpus(config, config_path)
    port = pick_port(args.port, args.host)
    out = Path(args.out) if args.out else Path("runs") / "nni" / Path(config_path).stem
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "best.json").unlink(missing_ok=True)  # never leave an older search's answer behind
    except OSError as e:
        raise SearchError(f"cannot write to --out {str(out)!r}: {e.strerror or e}") from None

    workdir = Path(tempfile.mkdtemp(prefix="nsr-search-"))
    prepare_environment(args.host, workdir)
    exp = Experiment(config)
    exp_root = Path(config.canonical_copy().experiment_working_directory)
    exp_dir = exp_root / exp.id
    url_host = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    print(f"experiment {exp.id}: {config_path}, up to {config.max_trial_number or 'unlimited'} trials"
          f"{', ' + str(config.max_experiment_duration) if config.max_experiment_duration else ''}")
    print(f"trial command: {_field(config, 'trial_command')}")

    records: dict[str, dict[str, Any]] = {}
    interrupted = False
    status = "UNKNOWN"
    errors: list[str] = []
    started = time.time()
    try:
        try:
            exp.start(port, debug=False, run_mode=RunMode.Background)
        except (KeyboardInterrupt, _Terminated):
            raise
        except Exception as e:
            raise SearchError(f"NNI manager did not start: {_one_line(e)} "
                              f"(log: {exp_dir / 'log'})") from None
        print(f"web UI: http://{url_host}:{port}  (NNI files: {exp_dir})")
        status, errors = _wait(exp, exp_dir, records, args.poll, _gpu_note(config))
    except (KeyboardInterrupt, _Terminated):
        interrupted = True
        print("\ninterrupted: stopping the experiment ...", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # one last look at the trials before the manager goes
        try:
            _refresh(exp, exp_dir, records, quiet=True)
        except Exception:
            pass
    finally:
        # no second Ctrl-C or SIGTERM may cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_experiment(exp)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_term)
        try:
            for f in workdir.iterdir():
                f.unlink()
            workdir.rmdir()
        except OSError:
            pass

    elapsed = time.time() - started
    if interrupted:
        status = "INTERRUPTED"
        for rec in records.values():
            if rec["status"] not in TERMINAL:
                rec["status"] = "INTERRUPTED"  # the manager cancelled it on the way out
    trials = sorted(records.values(), key=lambda r: r["sequence"])
    _write_json(out / "trials.json", {"experiment_id": exp.id, "config": config_path,
                                      "status": status, "trials": trials})
    best = best_of(trials)
    n_ok = sum(r["status"] == "SUCCEEDED" for r in trials)
    n_failed = sum(r["status"] == "FAILED" for r in trials)
    print(f"experiment {exp.id} {'interrupted' if interrupted else status.lower()} after "
          f"{elapsed:.0f} s: {n_ok} trial(s) succeeded, {n_failed} failed, {len(trials)} in all")
    if errors:
        for e in errors:
            print(f"error: NNI: {e}", file=sys.stderr)
    if best is None:
        if interrupted:
            return 130
        raise SearchError(f"no trial succeeded; see the trial logs under {exp_dir / 'environments'}")
    result = {
        "experiment_id": exp.id,
        "trial_id": best["trial_id"],
        "parameters": best["parameters"],
        "best_val_acc": best["best_val_acc"],
        "test_acc": best["test_acc"],
        "config": config_path,
        "trial_command": _field(config, "trial_command"),
        "trials_succeeded": n_ok,
        "trials_failed": n_failed,
        "trials_total": len(trials),
        "complete": not interrupted and status == "DONE",
        "trial_dir": str(_trial_dir(exp_dir, best["trial_id"]) or ""),
        "experiment_dir": str(exp_dir),
    }
    _write_json(out / "best.json", result)
    test = f"{best['test_acc']:.2f} %" if best["test_acc"] is not None else "n/a"
    lam = best["parameters"].get("lambda")
    head = f"best lambda = {lam:.6g}" if isinstance(lam, (int, float)) else "best parameters"
    print(f"{head} ({_fmt_params(best['parameters'])}; trial {best['trial_id']}): "
          f"validation {best['best_val_acc']:.2f} %, test {test}")
    print(f"wrote {out / 'best.json'}")
    print(f"to browse it again: nnictl view {exp.id} --experiment_dir {exp_root} --port {port}")
    return 130 if interrupted else 1 if status == "ERROR" else 0


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


def _no_trial_note(exp_dir: Path, gpu_note: str) -> str:
    log = exp_dir / "log" / "nnimanager.log"
    try:
        waiting_for_gpu = "GPU constraint cannot be satisfied" in log.read_text(errors="replace")
    except OSError:
        waiting_for_gpu = False
    if waiting_for_gpu:
        return (f"note: no trial has started yet: NNI is waiting for a GPU ({gpu_note}); free one, "
                "change --gpu-indices, or use --cpu")
    return f"note: no trial has started yet; NNI's log: {log}"


def _wait(exp, exp_dir: Path, records: dict[str, dict[str, Any]], poll: float,
          gpu_note: str = "") -> tuple[str, list[str]]:
    from nni.experiment import rest

    failures = 0
    started = time.time()
    noted = False
    while True:
        try:
            check = rest.get(exp.port, "/check-status", exp.url_prefix) or {}
            status = check.get("status", "UNKNOWN")
            _refresh(exp, exp_dir, records)
            failures = 0
        except Exception as e:  # the manager went away or hiccuped
            failures += 1
            if failures >= 5:
                return "ERROR", [f"lost contact with the NNI manager: {_one_line(e)}"]
            time.sleep(poll)
            continue
        active = any(r["status"] in ("WAITING", "RUNNING", "UNKNOWN") for r in records.values())
        if not noted and time.time() - started > NO_TRIAL_NOTE_S and not any(
                r["status"] != "WAITING" for r in records.values()):
            print(_no_trial_note(exp_dir, gpu_note), file=sys.stderr, flush=True)
            noted = True
        if status in ("DONE", "STOPPED"):
            return status, []
        if status == "ERROR":
            errs = [" ".join(str(e.get("message", e) if isinstance(e, dict) else e).split())
                    for e in check.get("errors") or []]
            return status, errs or ["the experiment stopped with an error; see its log"]
        if status == "TUNER_NO_MORE_TRIAL" and not active:
            return "DONE", []
        time.sleep(poll)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nsr.search",
        description="Run an NNI search (configs/nni/*.yml) to its end and report the best trial.")
    p.add_argument("config", help="NNI v2 experiment config, e.g. configs/nni/mlp4.yml")
    p.add_argument("--max-trials", type=int, metavar="N", help="override maxTrialNumber")
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error here
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _on_term(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.__class__ = _Parser
    args = parser.parse_args(argv)
    if args.max_trials is not None and args.max_trials < 1:
        parser.error(f"--max-trials must be at least 1, got {args.max_trials}")
    if args.poll <= 0:
        parser.error("--poll must be positive")
    # Ctrl-C must reach us even when started with SIGINT ignored (e.g. from a `&` job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_term)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _on_term)
    try:
        return run_search(args)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
