"""The output folder of a run (`--out`): the one place that locks, checks, creates, resumes and
replaces it.

    OUT/config.yaml    the settings of the run
    OUT/metrics.json   results so far; "finished": true once every epoch is trained
    OUT/history.csv    one row per finished epoch
    OUT/last.pt        the latest checkpoint (each epoch end, on Ctrl-C or SIGTERM, at a --max-steps stop)
    OUT/best.pt        the checkpoint at the best validation accuracy
    OUT/tb/            TensorBoard event files (nsr/train/tblog.py)
    OUT/.nsr.lock      while a run owns the folder: who it is (for messages only)

One run owns a folder at a time: it holds an exclusive OS lock (flock) on OUT/.nsr.lock from
before it reads anything there until it ends. The kernel releases the lock when the process dies,
however it dies, so holding the lock is also the proof that no earlier run is still at work: what
a killed run left (a run set aside by --overwrite, temporaries) is repaired under the lock, and
never by asking whether some process id is alive (ids are reused after a reboot and in containers).

A run that starts (anything but a resumption) is pending until it has written its first last.pt,
and the folder's other states are named by one subfolder, so that a crash at any file operation
leaves a state the next owner recognises and repairs without losing a file:

    OUT/.setting-aside-<pid>/   the run before is being moved in, file by file; the new run has
                                written nothing yet. Repair: move everything back.
    OUT/.previous-<pid>/        the run before, set aside whole (one rename); the run files in
                                OUT are the new run's. Repair: the new run has a last.pt -> delete
                                the folder; else delete the new run's files, then restore it.
    OUT/.restoring-<pid>/       the run before is going back (one rename after the new run's files
                                were deleted); the run files in OUT are the old run's. Repair: move
                                the rest back.

A new run in an empty folder sets aside nothing (an empty .previous-<pid>), so a run killed or
failing before its first checkpoint leaves OUT as it found it, never a config.yaml or best.pt
that would block the next start. `--overwrite`'s old run is deleted only once the new run has
written its first last.pt; if the new run fails before that (a bad setting, NaN, Ctrl-C, a full
disk) it is moved back at once, and if it is killed the next run to own OUT moves it back.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import io
import os
import re
import shutil
import socket
import sys

from .errors import UserError
from .fileio import read_json, remove_stale_temporaries, write_atomic, write_json

RUN_FILES = ("config.yaml", "metrics.json", "history.csv", "last.pt", "best.pt")
RUN_FOLDERS = ("tb",)  # set aside and put back with the files: a run's curves go with the run
LOCK_NAME = ".nsr.lock"
HISTORY_KEYS = ["epoch", "train_loss", "ce_loss", "reg_loss", "train_acc", "val_acc", "val_top5_acc",
                "lr", "epoch_time_s"]
# The folder's transitions, named by one subfolder each (see above).
SETTING_ASIDE, PREVIOUS, RESTORING = ".setting-aside-", ".previous-", ".restoring-"
_TRANSITION = re.compile(r"^(\.setting-aside-|\.previous-|\.restoring-)(\d+)$")


def warn(message: str) -> None:
    """A line on stderr that --quiet does not silence: something the user must know."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def default_out(model: str, dataset: str, regularizer: str, seed: int) -> str:
    method = "vanilla" if regularizer == "none" else regularizer
    return os.path.join("runs", f"{model}-{dataset}-{method}-s{seed}")


class OutputFolder:
    """`writer` is False on every rank but 0 under torchrun: those ranks check, never write, and
    take no lock (rank 0 holds it for all of them)."""

    def __init__(self, path: str, writer: bool = True):
        self.path, self.writer = path, writer
        self.pending: str | None = None    # OUT/.previous-<pid> until this run's first last.pt
        self.replacing = False             # ... and it holds a run (--overwrite), not nothing
        self.notice: str | None = None     # a warning for begin(): only once the run has loaded
        self._lock_fd: int | None = None
        self._created: list[str] = []      # folders acquire() made, removed again if the run never began
        self._began = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def finished(self) -> bool:
        return read_json(self.file("metrics.json")).get("finished") is True

    # -- ownership
    def acquire(self) -> None:
        """Take the folder's lock (creating the folder), or raise UserError naming the run that
        holds it. Also the check that this run can write there."""
        if not self.writer or self._lock_fd is not None:
            return
        path = os.path.abspath(self.path)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            self._created.append(path)  # deepest first
            path = os.path.dirname(path)
        lock = self.file(LOCK_NAME)
        if os.path.islink(lock) or (os.path.lexists(lock) and not os.path.isfile(lock)):
            # never followed, never written through: it is no lock file of ours
            raise UserError(f"{lock} is {'a link' if os.path.islink(lock) else 'not a file'}, not the lock file "
                            "a run makes; remove it, or choose another --out")
        try:
            os.makedirs(self.path, exist_ok=True)
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    self._remove_created()
                    raise UserError(f"{self.path} is in use by another run ({holder}); wait for it to end, "
                                    "or choose another --out") from None
                except OSError:
                    os.close(fd)
                    raise
                # The previous owner unlinks the file as it lets go: a lock on a file no longer
                # under that name locks nothing; take the new one.
                if _same_file(fd, lock):
                    break
                os.close(fd)
            self._lock_fd = fd
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_text().encode(), 0)
        except OSError as e:
            if self._lock_fd is not None:
                self.release()
            self._remove_created()
            raise UserError(f"cannot write to output folder {self.path} ({e.strerror or e}); "
                            "choose another --out") from None

    def release(self) -> None:
        """Let go of the folder (unlink the lock file, then close it); a folder this run created
        but never began to use is removed again."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.file(LOCK_NAME))
        os.close(self._lock_fd)
        self._lock_fd = None
        if not self._began:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (or not ours to remove): leave it and what is above it
        self._created = []

    def repair(self) -> None:
        """What a killed run left behind: put a run it had set aside back, delete its temporaries.
        Only the lock's holder may: no other run can be writing here."""
        if not self.writer or self._lock_fd is None:
            return
        for name in sorted(os.listdir(self.path)):
            match = _TRANSITION.match(name)
            folder = self.file(name)
            if match and os.path.isdir(folder) and not os.path.islink(folder):
                try:
                    self._finish_transition(match.group(1), match.group(2), folder)
                except OSError as e:  # each step is one the next owner can take again
                    raise UserError(f"{folder} holds what a killed run left, and it cannot be put back "
                                    f"({e.strerror or e}); make {self.path} writable (or choose another --out)") from None
        remove_stale_temporaries(self.path, RUN_FILES)

    # -- the run's state in the folder
    def prepare(self, resume: bool, overwrite: bool) -> str | None:
        """Before anything loads: check that this run may use the folder. Returns the checkpoint
        to resume from, or None. Reads only: every rank runs it, after rank 0's repair()."""
        for name in RUN_FILES:
            path = self.file(name)
            if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
                raise UserError(f"{path} is not a regular file (a folder, a link, a pipe, ...); move it away, "
                                "or choose another --out")
        for name in RUN_FOLDERS:  # set aside and restored with the run: never someone else's file
            path = self.file(name)
            if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)):
                raise UserError(f"{path} is not a folder (a file, a link, ...), where a run keeps its TensorBoard "
                                "events; move it away, or choose another --out")
        last = self.file("last.pt")
        if resume and os.path.isfile(last):
            return last
        present = [n for n in RUN_FILES if n != "config.yaml" and os.path.exists(self.file(n))]
        if resume:
            if present:
                raise UserError(f"--resume: {self.path} holds a run ({', '.join(present)}) but no last.pt "
                                "to continue from; pass --overwrite to start again, or choose another --out")
            self.notice = f"--resume: no checkpoint in {self.path}; starting a new run there"
        elif not overwrite:
            metrics = read_json(self.file("metrics.json"))
            if os.path.isfile(last) and metrics.get("stopped_by") == "max_steps":
                steps = metrics.get("global_steps")
                after = f" after {steps} steps" if isinstance(steps, int) and not isinstance(steps, bool) else ""
                raise UserError(f"{self.path} holds a run stopped by --max-steps{after}; continue it with "
                                "--resume (and a larger --max-steps, or none), or choose another --out")
            if metrics.get("finished") is True:
                raise UserError(f"{self.path} already holds a finished run; pass --overwrite to replace it, "
                                "or choose another --out")
            if os.path.isfile(last):
                raise UserError(f"{self.path} holds an unfinished run; pass --resume to continue it, "
                                "or --overwrite to start again")
            if present:  # a run's results without its checkpoint: not to be overwritten in silence
                raise UserError(f"{self.path} holds files of an earlier run ({', '.join(present)}) but no last.pt "
                                "to continue from; pass --overwrite to start again (they are kept until the new "
                                "run's first checkpoint), or choose another --out")
        return None

    def begin(self, fresh: bool, config_text: str) -> None:
        """Once the run has loaded: a fresh run (not a resumption) sets aside what OUT holds (the
        run it replaces, or nothing) and is pending until its first last.pt; then config.yaml."""
        if not self.writer:
            return
        if self.notice:
            warn(self.notice)
        if fresh:
            self._set_aside()
        self._began = True
        write_atomic(self.file("config.yaml"), config_text)

    def _set_aside(self) -> None:
        """Move the run files of OUT into a fresh subfolder, then name it .previous-<pid> in one
        rename. If a move fails (a full disk), what was moved goes back and nothing has changed."""
        aside, previous = (self.file(f"{prefix}{os.getpid()}") for prefix in (SETTING_ASIDE, PREVIOUS))
        old = [n for n in RUN_FILES + RUN_FOLDERS if os.path.lexists(self.file(n))]
        try:
            os.mkdir(aside)
            for name in old:
                os.rename(self.file(name), os.path.join(aside, name))
            os.rename(aside, previous)
        except OSError as e:
            with contextlib.suppress(OSError):  # else the next run that owns OUT moves them back
                _move_back(self.path, aside)
            raise UserError(f"cannot write to output folder {self.path} ({e.strerror or e}); nothing in it "
                            "was changed; free some space there (or choose another --out)") from None
        self.pending = previous
        self.replacing = bool(set(old) - {"config.yaml", *RUN_FOLDERS})  # a run's results, not a stray config.yaml

    def commit(self) -> None:
        """This run has written its first checkpoint: the run it replaced is no longer needed."""
        if self.pending is not None:
            shutil.rmtree(self.pending, ignore_errors=True)  # what is left, the next owner deletes
            self.pending, self.replacing = None, False

    def abandon(self) -> bool:
        """This run failed before its first checkpoint: delete what it wrote and put back what it
        set aside, so that OUT is as the run found it. True if that was a run (--overwrite)."""
        if self.pending is None:
            return False
        replaced, self._began = self.replacing, False
        with contextlib.suppress(OSError):  # a failure here leaves a state the next owner repairs
            _restore(self.path, self.pending)
        self.pending, self.replacing = None, False
        return replaced

    def _finish_transition(self, kind: str, pid: str, folder: str) -> None:
        """Repair what a run killed during a transition left (see the module's docstring)."""
        if kind == PREVIOUS and os.path.isfile(self.file("last.pt")):
            shutil.rmtree(folder)  # the new run had written its first checkpoint
            return
        if kind == PREVIOUS:
            deleted, restored = _restore(self.path, folder)
        else:
            deleted, restored = [], _move_back(self.path, folder)
        if restored:
            warn(f"restored the run in {self.path} that a new run (pid {pid}) had set aside "
                 f"({', '.join(restored)}); that run stopped before its first checkpoint")
        elif deleted:
            warn(f"deleted {', '.join(deleted)} in {self.path}: a run (pid {pid}) wrote them and stopped "
                 "before its first checkpoint")

    def write_metrics(self, metrics: dict) -> None:
        if not self.writer:
            return
        write_json(self.file("metrics.json"), metrics)
        text = io.StringIO(newline="")
        # then each watched layer's steadiness figure (nsr/train/evaluation.py), as the rows name them
        keys = dict.fromkeys(k for row in metrics["history"] for k in row)
        layers = [k for k in keys if k.startswith("intra_var_")]
        writer = csv.DictWriter(text, fieldnames=HISTORY_KEYS + layers, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(metrics["history"])
        write_atomic(self.file("history.csv"), text.getvalue())


def _holder_text() -> str:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n"


def _read_holder(fd: int) -> str:
    """Who holds the lock, as it wrote itself into the file: for the message only (a pid says
    nothing certain about liveness). Read defensively: the file may be empty or garbage."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace")
    except OSError:
        text = ""
    line = "".join(c for c in (text.splitlines() or [""])[0] if c.isprintable()).strip()
    return line or "it has not said who it is yet"


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _restore(out: str, previous: str) -> tuple[list[str], list[str]]:
    """Delete the pending run's files in `out`, then move those set aside in `previous` back (the
    folder renamed .restoring-<pid> first: from then on the run files in `out` are the old run's).
    Returns (deleted, restored) names."""
    deleted = []
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
            deleted.append(name)
    for name in RUN_FOLDERS:  # the pending run's curves; a kill in between repeats this step
        if os.path.isdir(os.path.join(out, name)):
            shutil.rmtree(os.path.join(out, name))
            deleted.append(name)
    restoring = os.path.join(out, RESTORING + os.path.basename(previous)[len(PREVIOUS):])
    os.rename(previous, restoring)
    return deleted, _move_back(out, restoring)


def _move_back(out: str, folder: str) -> list[str]:
    """Move the run files in `folder` (set aside from `out`) back into `out`, then remove it."""
    restored = []
    for name in RUN_FILES + RUN_FOLDERS:
        if os.path.lexists(os.path.join(folder, name)):
            os.replace(os.path.join(folder, name), os.path.join(out, name))
            restored.append(name)
    with contextlib.suppress(OSError):  # not empty: someone else's file is in it; it stays, with the folder
        os.rmdir(folder)
    return restored
