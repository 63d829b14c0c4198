"""Stop a training run at each file-system operation in turn (not a test; test_crash_points.py
starts it and checks what it leaves):

    python tests/crash_points.py ROOT MODE SCENARIO

MODE   kill     the process SIGKILLs itself just before its n-th file operation in the run folder
                (os.mkdir, os.open with O_CREAT, open for writing, torch.save, os.fsync, os.rename,
                os.replace, os.remove/unlink, os.rmdir, shutil.rmtree and the unlinks inside it)
       enospc   the n-th of those that can fail for a full disk (all but removals) raises ENOSPC
SCENARIO
       fresh      a new run in a new --out
       overwrite  --overwrite of a finished run (trained with another lr)
       restore    --overwrite interrupted by Ctrl-C before its first checkpoint, so that the old
                  run is moved back (kill mode only: a kill at each operation of the move)
       resume     --resume of a run stopped by --max-steps inside its second epoch

For every n from 1 to the number of operations of the undisturbed run, in ROOT/points/<n>/run,
it runs the script (one fork of this process per run: torch is imported once), then the recovery
the project documents, and writes ROOT/points.json: each point's operation, what each command
exited with and printed, and the folder the stopped run left (tests.helpers.snapshot). ROOT/straight is the undisturbed new run; ROOT/old the run
that --overwrite replaces.
"""

import builtins
import errno
import json
import os
import runpy
import shutil
import signal
import sys
import traceback

os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

import nsr.train.engine as engine  # noqa: E402
from tests.helpers import ROOT, snapshot, step_then_signal  # noqa: E402

SCRIPT = os.path.join(ROOT, "fdnn_nsr.py")
# 1,150 training images of digits at batch 128: 8 steps an epoch
RUN = ["--dataset", "digits", "--batch-size", "128", "--lr", "0.05", "--momentum", "0.9", "--quiet"]
# A new run trains 2 epochs (a kill in the second resumes into it), a replacing one 1 (its ops
# after the first checkpoint are those of the new run's); the run replaced has another lr.
EPOCHS = {"fresh": "2", "overwrite": "1", "restore": "1", "resume": "2"}
OLD = {"overwrite": [*RUN, "--epochs", "1", "--lr", "0.02"],  # (argparse keeps the last --lr)
       "restore": [*RUN, "--epochs", "1", "--lr", "0.02"],
       "resume": [*RUN, "--epochs", "2", "--max-steps", "12"]}  # stopped in epoch 2, at its step 3
WRITES = {"mkdir", "os.open", "open", "torch.save", "fsync", "rename", "replace"}


class Faults:
    """Counts the file operations under `root`; at the `at`-th one, kills the process (kill) or
    raises ENOSPC (enospc, counting only operations that can fail so). `at` 0: count only."""

    def __init__(self, root: str, mode: str, at: int):
        self.root, self.mode, self.at, self.log = os.path.realpath(root), mode, at, []

    def hit(self, op: str, path) -> None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(path))
        if not (path == self.root or path.startswith(self.root + os.sep)):
            return
        if self.mode == "enospc" and (op not in WRITES or (op == "mkdir" and os.path.lexists(path))):
            return  # (a mkdir where a folder is fails with EEXIST, which makedirs(exist_ok) expects)
        self.log.append(f"{op} {os.path.relpath(path, self.root)}")
        if len(self.log) == self.at:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _at_fd(name, dir_fd):
    return name if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fsdecode(name))


def install(faults: Faults) -> None:
    real = {name: getattr(os, name) for name in ("mkdir", "open", "fsync", "rename", "replace", "remove", "unlink",
                                                  "rmdir")}
    real_open, real_rmtree, real_save = builtins.open, shutil.rmtree, torch.save

    def two(name):
        def wrapped(src, dst, *args, **kwargs):
            faults.hit(name, src)
            return real[name](src, dst, *args, **kwargs)
        return wrapped

    def one(name):
        def wrapped(path, *args, dir_fd=None, **kwargs):
            faults.hit(name, _at_fd(path, dir_fd))
            return real[name](path, *args, dir_fd=dir_fd, **kwargs)
        return wrapped

    def os_open(path, flags, *args, dir_fd=None, **kwargs):
        if flags & os.O_CREAT:
            faults.hit("os.open", _at_fd(path, dir_fd))
        return real["open"](path, flags, *args, dir_fd=dir_fd, **kwargs)

    def fsync(fd):
        faults.hit("fsync", os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
        return real["fsync"](fd)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
            faults.hit("open", file)
        return real_open(file, mode, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        faults.hit("rmtree", path)
        return real_rmtree(path, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        faults.hit("torch.save", getattr(f, "name", f))
        return real_save(obj, f, *args, **kwargs)

    os.rename, os.replace = two("rename"), two("replace")
    os.mkdir, os.remove, os.unlink, os.rmdir = one("mkdir"), one("remove"), one("unlink"), one("rmdir")
    os.open, os.fsync, builtins.open, shutil.rmtree, torch.save = os_open, fsync, open_, rmtree, save


def run(argv: list[str], log: str, faults: Faults | None = None, signal_at: int | None = None) -> dict:
    """The script in a fork of this process: {"exit": code or -signal, "stderr": ...}."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if signal_at is not None:
                engine.Trainer.train_step = step_then_signal(engine.Trainer.train_step, signal_at)
            if faults is not None:
                install(faults)
            sys.argv = [SCRIPT, *argv]
            try:
                runpy.run_path(SCRIPT, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            if faults is not None and faults.at == 0:
                with open(log + ".ops", "w") as f:  # (counting only: no fault to meet)
                    json.dump(faults.log, f)
        except BaseException:  # noqa: BLE001 -- a traceback is an outcome the test reports
            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(log) as f:
        return {"exit": code, "stderr": f.read()}


def warm_up(out: str) -> None:
    """One run in this process first: the forks then start with every import and cache warm
    (0.2 s a run instead of 5)."""
    sys.argv = [SCRIPT, *RUN, "--epochs", "1", "--out", out]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    except SystemExit as e:
        assert not e.code, e.code


def main(root: str, mode: str, scenario: str) -> None:
    straight, old = os.path.join(root, "straight"), os.path.join(root, "old")
    warm_up(os.path.join(root, "warm-up"))
    new = [*RUN, "--epochs", EPOCHS[scenario]]
    assert run([*new, "--out", straight], os.path.join(root, "straight.log"))["exit"] == 0
    command, signal_at = [*new, "--out", "OUT"], None
    if scenario != "fresh":
        assert run([*OLD[scenario], "--out", old], os.path.join(root, "old.log"))["exit"] == 0
        command.append("--resume" if scenario == "resume" else "--overwrite")
        signal_at = 3 if scenario == "restore" else None

    def prepared(n: int) -> str:
        out = os.path.join(root, "points", str(n), "run")
        os.makedirs(os.path.dirname(out))
        if scenario != "fresh":
            shutil.copytree(old, out)  # copy2: bytes and times, as the test compares them
        return out

    def argv(out: str, *extra: str) -> list[str]:
        return [out if a == "OUT" else a for a in command] + list(extra)

    out = prepared(0)
    counted = Faults(out, mode, 0)
    first = run(argv(out), os.path.join(root, "count.log"), counted, signal_at)
    with open(os.path.join(root, "count.log.ops")) as f:
        ops = json.load(f)
    points = []
    for n in range(1, len(ops) + 1):
        out = prepared(n)
        folder = os.path.dirname(out)
        faulted = run(argv(out), os.path.join(folder, "fault.log"), Faults(out, mode, n), signal_at)
        state = snapshot(out)  # what the stopped run left, before any repair
        again = None
        if mode == "enospc" and faulted["exit"] == 2 and "--resume" not in faulted["stderr"]:
            again = list(argv(out))        # the message says: run the same command again
        if mode == "kill" or again is None:
            again = argv(out, "--resume") if "--overwrite" not in command else \
                [a for a in argv(out) if a != "--overwrite"] + ["--resume"]
        recovered = run(again, os.path.join(folder, "recovery.log"))
        points.append({"n": n, "op": ops[n - 1], "fault": faulted, "left": state, "recovery": again,
                       "recovered": recovered})
    with open(os.path.join(root, "points.json"), "w") as f:
        json.dump({"undisturbed": first, "ops": ops, "points": points}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
