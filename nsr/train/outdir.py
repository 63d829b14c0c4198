"""The output folder of a run (`--out`): the one place that checks, creates, resumes and replaces it.

    OUT/config.yaml    the settings of the run
    OUT/metrics.json   results so far; "finished": true once the run is done
    OUT/history.csv    one row per finished epoch
    OUT/last.pt        the latest checkpoint (each epoch end, on Ctrl-C, at a --max-steps stop)
    OUT/best.pt        the checkpoint at the best validation accuracy

A finished run is never lost to a new one that cannot run: `--overwrite` moves the old run's files
into OUT/.previous-<pid>/ and deletes them only once the new run has written its first last.pt. If
the new run fails before that (a bad setting, NaN, Ctrl-C, an exception) they are moved back; if
it is killed, the next start in OUT moves them back.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import sys

from .errors import UserError
from .fileio import (
    process_alive,
    read_json,
    remove_stale_temporaries,
    write_atomic,
    write_json,
)

RUN_FILES = ("config.yaml", "metrics.json", "history.csv", "last.pt", "best.pt")
HISTORY_KEYS = ["epoch", "train_loss", "ce_loss", "nsr_loss", "train_acc", "val_acc", "val_top5_acc",
                "lr", "epoch_time_s"]
_PREVIOUS = re.compile(r"^\.previous-(\d+)$")


def warn(message: str) -> None:
    """A line on stderr that --quiet does not silence: something the user must know."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def default_out(model: str, dataset: str, regularizer: str, seed: int) -> str:
    method = "vanilla" if regularizer == "none" else regularizer
    return os.path.join("runs", f"{model}-{dataset}-{method}-s{seed}")


class OutputFolder:
    """`writer` is False on every rank but 0 under torchrun: those ranks check, never write."""

    def __init__(self, path: str, writer: bool = True):
        self.path, self.writer = path, writer
        self.previous: str | None = None   # the replaced run, until the new one has a checkpoint
        self.notice: str | None = None     # a warning for begin(): only once the run has loaded

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def finished(self) -> bool:
        return read_json(self.file("metrics.json")).get("finished") is True

    def prepare(self, resume: bool, overwrite: bool) -> str | None:
        """Before anything loads: repair what a killed run left, check that this run may use the
        folder and can write to it. Returns the checkpoint to resume from, or None."""
        if self.writer and os.path.isdir(self.path):
            self._recover_previous()
            remove_stale_temporaries(self.path)
        last = self.file("last.pt")
        if resume and os.path.isfile(last):
            return last
        present = [n for n in RUN_FILES if n != "config.yaml" and os.path.exists(self.file(n))]
        if resume and not overwrite:
            if present:
                raise UserError(f"--resume: {self.path} holds a run ({', '.join(present)}) but no last.pt "
                                "to continue from; pass --overwrite to start again, or choose another --out")
            self.notice = f"--resume: no checkpoint in {self.path}; starting a new run there"
        elif not overwrite and self.finished():
            raise UserError(f"{self.path} already holds a finished run; pass --overwrite to replace it, "
                            "or choose another --out")
        elif not overwrite and os.path.isfile(last):
            raise UserError(f"{self.path} holds an unfinished run; pass --resume to continue it, "
                            "or --overwrite to start again")
        if self.writer:
            self._check_writable()
        return None

    def _check_writable(self) -> None:
        created, path = [], os.path.abspath(self.path)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            created.append(path)  # deepest first: removed again below, made by begin()
            path = os.path.dirname(path)
        probe = self.file(f".write-test.{os.getpid()}")
        try:
            os.makedirs(self.path, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to output folder {self.path} ({e.strerror}); "
                            "choose another --out") from None
        finally:
            for folder in created:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass

    def begin(self, replace: bool, config_text: str) -> None:
        """Once the run has loaded: create the folder, set a replaced run aside, write config.yaml."""
        if not self.writer:
            return
        if self.notice:
            warn(self.notice)
        os.makedirs(self.path, exist_ok=True)
        old = [n for n in RUN_FILES if os.path.exists(self.file(n))]
        if replace and old:
            self.previous = self.file(f".previous-{os.getpid()}")
            os.makedirs(self.previous, exist_ok=True)
            for name in old:
                os.replace(self.file(name), os.path.join(self.previous, name))
        write_atomic(self.file("config.yaml"), config_text)

    def commit(self) -> None:
        """The new run has written a checkpoint: the replaced run is no longer needed."""
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None

    def abandon(self) -> bool:
        """The new run failed before its first checkpoint: put the replaced run back. True if one was."""
        if self.previous is None:
            return False
        _restore(self.path, self.previous)
        self.previous = None
        return True

    def _recover_previous(self) -> None:
        for name in os.listdir(self.path):
            match = _PREVIOUS.match(name)
            if not match or int(match.group(1)) == os.getpid() or process_alive(int(match.group(1))):
                continue
            previous = self.file(name)
            if os.path.isfile(self.file("last.pt")):  # the new run got as far as a checkpoint
                shutil.rmtree(previous, ignore_errors=True)
            else:
                _restore(self.path, previous)
                warn(f"restored the run in {self.path} that an --overwrite run (pid {match.group(1)}) "
                     "had set aside; that run stopped before its first checkpoint")

    def write_metrics(self, metrics: dict) -> None:
        if not self.writer:
            return
        write_json(self.file("metrics.json"), metrics)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=HISTORY_KEYS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(metrics["history"])
        write_atomic(self.file("history.csv"), text.getvalue())


def _restore(out: str, previous: str) -> None:
    """Replace the run files in `out` by those saved in `previous`, then remove `previous`."""
    for name in RUN_FILES:
        try:
            os.remove(os.path.join(out, name))
        except FileNotFoundError:
            pass
    for name in os.listdir(previous):
        os.replace(os.path.join(previous, name), os.path.join(out, name))
    os.rmdir(previous)
