"""What python -m nsr search does around NNI 3.0's gaps, one function per problem.

Each docstring names the NNI version and the problem, so that a function can be deleted once NNI
fixes it. nsr/search.py is the launcher (arguments, config, start, wait, best.json); it calls these.
Not here: NNI 3.0's nnictl imports pkg_resources, gone from setuptools 81, hence the
`setuptools<81` pin in pyproject.toml.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from nsr.train.errors import UserError, one_line

from .watchdog import end_groups, manager_groups

GRACEFUL_STOP_S = 30  # NNI stops trials with SIGINT, then SIGKILL after 5 s
REST_TIMEOUT_S = 10   # NNI's default, 20 s a request, makes a hung manager slow to give up on


def silence_stdout_log() -> None:
    """NNI 3.0: importing nni.experiment adds a stdout log handler, which would interleave the
    manager's chatter with python -m nsr search's own lines. Its log file keeps everything."""
    import nni.runtime.log as nni_log

    nni_log.silence_stdout()


def shorten_rest_timeout(seconds: float = REST_TIMEOUT_S) -> None:
    """NNI 3.0: every REST request to the manager may take 20 s to time out, so a manager that
    hangs keeps the launcher waiting minutes before it gives up. NNI has no option for it."""
    import nni.experiment.rest as nni_rest

    nni_rest.timeout = seconds


def require_filelock_below_3_12() -> None:
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
        raise UserError(f"filelock {found} is installed, but NNI 3.0 needs filelock<3.12 (with a "
                        "newer one it hangs while starting); run: pip install 'filelock<3.12'")


def forget_config_base_path() -> None:
    """NNI 3.0: ExperimentConfig.load() sets a module-global base path for relative paths and
    unsets it only when the config is built; after a file with an unknown field, every later load
    in the same process fails with a bare AssertionError. Call it after a failed load."""
    from nni.experiment.config.utils import unset_base_path

    unset_base_path()


# Node.js preload for the NNI manager: a server started with only a port listens on HOST.
_LOOPBACK_JS = r"""'use strict';
// Written by python -m nsr search: NNI 3.0 listens on every interface and has no option to change it.
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


def listen_on_loopback(host: str, workdir: Path) -> None:
    """NNI 3.0's web UI and REST API listen on every interface, with no option to change it.
    The manager inherits NODE_OPTIONS: a --require preload gives servers started without a host
    the address `host`. host 0.0.0.0 keeps NNI's default."""
    if host == "0.0.0.0":
        return
    preload = workdir / "nsr_listen_loopback.js"
    preload.write_text(_LOOPBACK_JS, encoding="utf-8")
    os.environ["NSR_NNI_LISTEN_HOST"] = host
    opts = os.environ.get("NODE_OPTIONS", "")
    os.environ["NODE_OPTIONS"] = f"{opts} --require {json.dumps(str(preload))}".strip()


def bypass_proxy_for_localhost() -> None:
    """NNI 3.0's clients (launcher, tuner, trials) reach the manager at http://localhost:PORT
    through `requests`, which honours HTTP_PROXY: with a proxy set, every call fails."""
    no_proxy = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
    for h in ("localhost", "127.0.0.1", "::1"):
        if h not in no_proxy:
            no_proxy.append(h)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(no_proxy)


def check_search_space(space, where: str) -> None:
    """NNI 3.0 hands the search space to the tuner only once the manager runs; a space the tuner
    cannot use (loguniform [0, 10], uniform [5, 1], an unknown _type, ...) kills the tuner's
    worker and the experiment then sits RUNNING until maxExperimentDuration. Check it first with
    NNI's own validator and the formatter its tuners use."""
    from nni.common.hpo_utils import format_search_space, validate_search_space

    if not isinstance(space, dict) or not space:
        raise UserError(f"{where} has no searchSpace; add one, e.g. "
                        "`lambda: {_type: loguniform, _value: [0.001, 10]}`")
    for name, spec in space.items():
        if isinstance(spec, dict) and spec.get("_type") == "choice" and spec.get("_value") == []:
            raise UserError(f"{where}: search space {name!r} is a choice with no values; list some")
    try:
        validate_search_space(space, raise_exception=True)
        format_search_space(space)
    except Exception as e:
        raise UserError(f"{where}: {one_line(e)}") from None


def dead_tuner_error(exp_dir: Path) -> str | None:
    """NNI 3.0: an exception in the tuner ends the dispatcher's worker thread, but the dispatcher
    process stays up, the manager reports RUNNING and no trial ever starts. The traceback is only
    in log/dispatcher.log: return its last line (e.g. "ValueError: math domain error"), or None."""
    try:
        lines = (exp_dir / "log" / "dispatcher.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            last = None
            for following in lines[i + 1:]:
                if following.startswith("["):  # the next log record
                    break
                if following.strip() and not following[0].isspace():
                    last = following.strip()  # the exception line, after the indented frames
            return last or "see the log"
    return None


def start_watchdog(exp_id: str) -> subprocess.Popen:
    """NNI 3.0 starts the manager in a process group of its own (the tuner and the trials live in
    it too) with nothing tying it to the launcher: kill -9 of the launcher leaves them all running.
    A small process, in a session of its own, ends that group when the launcher dies; the launcher
    terminates it after a normal stop."""
    script = Path(__file__).with_name("watchdog.py")
    return subprocess.Popen([sys.executable, str(script), str(os.getpid()), exp_id],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop_experiment(exp, grace_s: float = GRACEFUL_STOP_S) -> None:
    """NNI 3.0's Experiment.stop() waits for ever on a manager that does not answer, and a Ctrl-C
    while the manager starts leaves it running unknown to `exp`. Stop it gracefully with a
    deadline, then end whatever is left of the manager's process group (tuner and trials)."""
    atexit.unregister(exp.stop)
    groups = manager_groups(exp.id)
    if groups:
        t = threading.Thread(target=exp.stop, daemon=True)  # DELETE /experiment, then wait
        t.start()
        t.join(grace_s)
    end_groups(groups, grace_s=5)


def visible_gpu_count() -> int | None:
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


def check_gpus(config, config_path: str) -> None:
    """NNI 3.0 waits for ever, silently, for a GPU that is not there (trialGpuNumber > 0 on a
    machine without one, a gpuIndices entry that does not exist). Fail fast instead."""
    ts = config.canonical_copy().training_service
    need = ts.trial_gpu_number or 0
    if need <= 0:
        return
    count = visible_gpu_count()
    if count is None:
        return  # cannot tell; let NNI schedule
    if count == 0:
        raise UserError(f"{config_path} asks for {need} GPU per trial (trialGpuNumber) but no "
                        "NVIDIA GPU is visible; add --cpu to train on the CPU")
    bad = [i for i in (ts.gpu_indices or []) if i >= count]
    if bad:
        raise UserError(f"GPU index {bad[0]} does not exist: {count} GPU(s) visible "
                        f"(0..{count - 1}); fix --gpu-indices or trainingService.gpuIndices")
    usable = len(ts.gpu_indices) if ts.gpu_indices else count
    if need > usable:
        raise UserError(f"trialGpuNumber is {need} but only {usable} GPU(s) can be used")


def no_trial_note(exp_dir: Path, gpu_note: str) -> str:
    """NNI 3.0 says nothing while its GPU scheduling holds every trial back (on an H200 machine,
    trialGpuNumber 1 started no trial within 70 s): the note python -m nsr search prints when no trial has
    started after a while, naming the GPU wait when NNI's log shows one."""
    log = exp_dir / "log" / "nnimanager.log"
    try:
        waiting_for_gpu = "GPU constraint cannot be satisfied" in log.read_text(errors="replace")
    except OSError:
        waiting_for_gpu = False
    if waiting_for_gpu:
        return (f"note: no trial has started yet: NNI is waiting for a GPU ({gpu_note}); free one, "
                "change --gpu-indices, or use --cpu")
    return f"note: no trial has started yet; NNI's log: {log}"


def link_tensorboard_for_web_ui(tb_dir: str) -> None:
    """NNI 3.0, local training service: the web UI's TensorBoard button reads
    <experiment>/trials/<trial-id>/output/tensorboard, but a trial's NNI_OUTPUT_DIR (where NNI's
    docs tell trials to write `tensorboard/`) is <experiment>/environments/<env>/trials/<trial-id>
    (microsoft/nni#5609). A link from the first to `tb_dir` lets the button show the trial. Other
    platforms' trials run elsewhere, and NNI 3.0 fetches none of their files: nothing to link."""
    trial, out = os.environ.get("NNI_TRIAL_JOB_ID", ""), Path(os.environ.get("NNI_OUTPUT_DIR", ""))
    if os.environ.get("NNI_PLATFORM") != "local" or not trial or len(out.parents) < 4 \
            or (out.parents[2].name, out.parent.name, out.name) != ("environments", "trials", trial):
        return
    link = out.parents[3] / "trials" / trial / "output" / "tensorboard"
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(link):
            link.symlink_to(os.path.abspath(tb_dir), target_is_directory=True)
    except OSError as e:  # the trial's own files are written all the same
        print(f"note: NNI's web UI will not show this trial's TensorBoard ({one_line(e)}); "
              f"open it with: tensorboard --logdir {tb_dir}", file=sys.stderr, flush=True)
