"""What several test files share: paths and the digits runs' arguments, one free port, the
script runners (in a subprocess or in-process), the check of the one-line error convention,
folder fingerprints and run results, data sets written by hand, and signals sent at a chosen
point of a run.

run_in_process goes through the entry points the commands use: a training script's file itself
(runpy, as `python fdnn_nsr.py` runs it) or `python -m nsr <command>`'s dispatcher, each ending in
nsr.train.errors.run_cli, so the exit code and the `error:` line are the real ones; only the
start of a process (torch's import) is saved. One subprocess test per script and command (marked
slow) proves the process's own exit code and that no traceback leaks.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass

import torch

from nsr.__main__ import main as nsr_main
from nsr.train.checkpoint import load_checkpoint
from nsr.train.datasets import IDX_FILES
from nsr.train.engine import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP4 = os.path.join(ROOT, "configs", "mlp4.yaml")  # fdnn_nsr.py's and fdnn_vanilla.py's default config
TIMES = {"epoch_time_s", "train_time_s"}          # what differs between two runs of the same steps
# The digits run the engine's tests share (conftest.py's digits_reference): fdnn_nsr.py (MLP-4 +
# NSR) on scikit-learn's digits, with momentum so that a resume must restore the optimizer too.
DIGITS = ["--dataset", "digits", "--batch-size", "32", "--lr", "0.05", "--momentum", "0.9", "--quiet"]
DIGITS_EPOCHS = 4
STEPS_PER_EPOCH = 36  # 1,437 images - 287 held out = 1,150 to train on; batch 32, the last single one dropped
REFERENCE_ARGS = [*DIGITS, "--epochs", str(DIGITS_EPOCHS)]  # digits_reference's settings: --resume accepts them
DIGITS_BASE = ["--dataset", "digits", "--batch-size", "32", "--quiet"]  # lr and momentum from the config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- running the entry points

def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None, check: bool = True,
               cwd: str = ROOT) -> subprocess.CompletedProcess:
    """One of the repository's scripts ("fdnn_nsr.py", "tests/signal_at.py") or commands ("-m nsr
    demo") in a subprocess, with this checkout first on PYTHONPATH; `env` adds to the environment."""
    cmd = [sys.executable, *(script.split() if script.startswith("-m ") else [os.path.join(ROOT, script)]), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Result:
    code: int  # the exit code the process would have had
    out: str
    err: str


def run_in_process(script: str, *args: str) -> Result:
    """run_script's twin in this process: "fdnn_nsr.py" runs that file as __main__ (runpy); "-m nsr
    report" goes through nsr/__main__.py's dispatcher, as `python -m nsr report` does. stdout and
    stderr are captured; sys.argv and the handlers of SIGINT, SIGTERM and SIGHUP (python -m nsr
    search sets them) are put back afterwards."""
    if script.startswith("-m "):
        module, name = script.split()[1:]
        assert module == "nsr", script
        argv = ["-m", "nsr", name, *args]

        def entry():
            with warnings.catch_warnings():
                # runpy's note that pytest imported the command's module already; `python -m` has not
                warnings.filterwarnings("ignore", r"'nsr\..*' found in sys.modules", RuntimeWarning)
                nsr_main([name, *args])
    else:
        path = os.path.join(ROOT, script)
        argv = [path, *args]

        def entry():
            runpy.run_path(path, run_name="__main__")
    signals = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    handlers = {s: signal.getsignal(s) for s in signals}
    saved_argv, sys.argv = sys.argv, argv
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return Result(code, out.getvalue(), err.getvalue())


def run_main(capsys, argv, **kwargs) -> tuple[int, str]:
    """fdnn_nsr.py's main() in-process, configs/mlp4.yaml its defaults: (exit code, stderr)."""
    try:
        train_main(default_config=MLP4, argv=argv, **kwargs)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def run_vanilla_script(capsys, monkeypatch, argv) -> tuple[int, str]:
    """fdnn_vanilla.py itself, in-process: (exit code, stderr)."""
    script = os.path.join(ROOT, "fdnn_vanilla.py")
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    """The error convention: exactly one line on stderr, `error: ...`, holding every fragment."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_error(result: Result, *fragments: str) -> str:
    """Exit code 2 and the one `error:` line holding every fragment; returns the line."""
    assert result.code == 2, (result.code, result.out, result.err)
    return assert_one_error_line(result.err, *fragments)


# ---------------------------------------------------------------------------------- files and results

def fingerprint(folder) -> dict:
    """Bytes and mtime of every file under `folder`, and the name of every folder in it: proof
    that nothing was touched and that no file or folder came or went."""
    result = {}
    for parent, folders, files in os.walk(folder):
        for name in folders:
            result[os.path.relpath(os.path.join(parent, name), folder)] = "folder"
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return result


def snapshot(folder) -> dict | None:
    """fingerprint() as plain JSON data (a digest of the bytes, and the mtime), None if `folder`
    does not exist: for a process to record the state it left."""
    if not os.path.isdir(folder):
        return None
    return {name: value if value == "folder" else [hashlib.sha256(value[0]).hexdigest(), value[1]]
            for name, value in fingerprint(folder).items()}


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMES} for row in history]


def outcome(m: dict) -> dict:
    """What a resumed run must reproduce exactly: every key of its metrics but the timings."""
    times = {"epoch_time_s", "train_time_s", "eval_time_s"}
    keep = {k: v for k, v in m.items() if k not in times | {"history", "partial_epoch"}}
    keep["history"] = [{k: v for k, v in row.items() if k not in times} for row in m["history"]]
    return keep


def same_weights(a: str, b: str) -> bool:
    """The checkpoints at paths `a` and `b` hold the same model weights and regularizer state."""
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    return all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]) and \
        all(torch.equal(sa["regularizer"][k], sb["regularizer"][k]) for k in sa["regularizer"])


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def strict_json(path) -> dict:
    """A JSON file read as strict JSON: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


def write_file(tmp_path, name: str, text: str) -> str:
    """tmp_path/name holding `text`; returns its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def copy_of(reference, tmp_path, name: str = "run") -> str:
    """A copy of a session fixture's run folder (reference[0]) in tmp_path/name, for a test that
    changes it."""
    out = str(tmp_path / name)
    shutil.copytree(reference[0], out)
    return out


@contextlib.contextmanager
def gloo_rank(rank: int, port: int, world: int = 2):
    """Inside a spawned process: be torchrun's rank `rank` of `world` (gloo, CPU, one thread) for
    the engine, and leave no process group behind, however the block ends."""
    import gc

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        gc.collect()  # the trainer's DDP wrapper holds the group: free it first (as engine.main does)
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------- signals at a chosen point

def step_then_signal(train_step, at: int, sig: int = signal.SIGINT):
    """A Trainer.train_step that sends `sig` to this process right after global step `at` (1-based,
    counted over the whole run, a resumed one included): the signal meets the real handler at the
    same point on any machine, however fast or loaded."""
    def wrapped(self, xb, yb):
        train_step(self, xb, yb)
        if self.pos.global_step + 1 == at:  # the engine advances the position after the step
            os.kill(os.getpid(), sig)
    return wrapped


def save_then_signal(save, epoch: int, sig: int = signal.SIGKILL):
    """A torch.save that sends `sig` to this process once the last.pt of the end of `epoch`
    (1-based) is complete in its temporary file, before the rename that would publish it: a kill
    at the worst moment of a checkpoint write."""
    def wrapped(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        target = getattr(f, "name", f)  # a path, or the open temporary file save_checkpoint passes
        name = os.path.basename(os.fspath(target)) if isinstance(target, (str, os.PathLike)) else ""
        position = obj.get("position") if isinstance(obj, dict) else None
        if name.startswith("last.pt.tmp.") and position and (position["epoch"], position["step"]) == (epoch, 0):
            os.kill(os.getpid(), sig)
    return wrapped


# ---------------------------------------------------------------------------------- TensorBoard event files

def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files in `folder`, read by TensorBoard's own
    reader, which applies what the files say (a resumed run's purge of the steps it logs again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def numpy_intra(z, y) -> float:
    """The steadiness figure by its definition, in numpy: per neuron the class-size-weighted
    population variance within each class, averaged over neurons (z: N x D, y: N labels)."""
    import numpy as np

    n = len(y)
    per_neuron = np.zeros(z.shape[1])
    for c in np.unique(y):
        zc = z[y == c]
        per_neuron += len(zc) / n * ((zc - zc.mean(axis=0)) ** 2).mean(axis=0)
    return float(per_neuron.mean())


# ---------------------------------------------------------------------------------- data sets written by hand

def idx_bytes(array) -> bytes:
    """The idx format written by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, data."""
    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_like(folder, n_train=60, n_test=20, gz=True, size=28):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, size, size)),
        "test_labels": np.arange(n_test) % 10,
    }
    os.makedirs(folder, exist_ok=True)
    for key, array in arrays.items():
        data = idx_bytes(array)
        path = os.path.join(folder, IDX_FILES[key] + (".gz" if gz else ""))
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
            f.write(data)
    return arrays


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_like(data_dir, n=10, seed=0):
    """cifar-10-batches-py/ as the python version of CIFAR-10 has it: dicts of a uint8 'data'
    array N x 3072 (1024 red, then green, then blue values, rows of 32) and a list of 'labels',
    pickled with protocol 2 and numpy named as the numpy of 2009 did (numpy.core.multiarray)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    os.makedirs(folder)
    batches = {}
    for name in CIFAR_FILES:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)
        batches[name] = batch
    return folder, batches


def save_image(path, pixels) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def write_folder(root, train: dict, val: dict, size: int = 8, seed: int = 0) -> None:
    """An ImageNet-style folder. train/val: class name -> number of images; random textured RGB
    images (PNG and JPEG)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, classes in (("train", train), ("val", val)):
        for name, count in classes.items():
            for i in range(count):
                ext = "png" if i % 2 else "JPEG"
                save_image(os.path.join(root, split, name, f"{i}.{ext}"), rng.integers(0, 256, (size, size, 3)))


def nan_first(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with its first entry NaN (a damaged tensor for load checks)."""
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t
