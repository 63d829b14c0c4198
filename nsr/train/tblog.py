"""TensorBoard event files of a run, written while it trains (TensorBoard's own event format and
writer of records, with torch.utils.tensorboard's summaries).

    tensorboard --logdir runs          # every run under runs/, side by side

On by default when the `tensorboard` package is installed (`tensorboard: false` in the YAML or
`--no-tensorboard` turns it off); without the package a run says so in one line and trains on.
Only rank 0 writes. The files go into OUT/tb/, or where the engine's hooks say (an NNI trial:
$NNI_OUTPUT_DIR/tensorboard, where NNI's web UI looks).

One x axis for every tag, the optimizer step (as Lightning does): each epoch's figures sit at the
step that ends the epoch, and every STEP_EVERY steps the step's own losses are logged. A single
axis is what makes resuming exact: a resumed run's file starts with TensorBoard's start-of-run
marker at the checkpoint's step + 1 (SummaryWriter's purge_step), and TensorBoard then drops what
a stopped or killed run had logged after that checkpoint, on every tag at once. Everything logged
up to a checkpoint is flushed before the checkpoint is written, so nothing the resumed run will not
log again can be lost.
"""

from __future__ import annotations

import errno
import glob
import os
import socket
import sys
import time

from .errors import UserError, one_line
from .fileio import write_failure

STEP_EVERY = 50  # steps between per-step scalars: one read of the step's losses (a host sync on a GPU)
EVENT_FILES = "events.out.tfevents.*"


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _stamp(path: str) -> int:
    """The second in an event file's name, events.out.tfevents.<seconds>.<host>.<pid>.<n>."""
    field = os.path.basename(path).partition(".tfevents.")[2].partition(".")[0]
    return int(field) if field.isdigit() else 0


class TensorBoardLog:
    """The writer of one run; every method does nothing when logging is off (no writer)."""

    def __init__(self, writer=None, stale: list[str] | None = None):
        self.writer = writer         # (RecordWriter, Event, scalar) while the file is open
        self.path: str | None = None  # the event file this writer writes
        self.stale = stale or []     # event files of an earlier attempt this new run replaces

    @classmethod
    def open(cls, log_dir: str, global_step: int) -> "TensorBoardLog":
        """A writer in `log_dir` for a run that starts (or resumes) after `global_step` steps."""
        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.summary.writer.record_writer import RecordWriter
            from torch.utils.tensorboard.summary import scalar
        except ImportError:
            note("tensorboard is not installed, so this run writes no TensorBoard events; "
                 "pip install tensorboard, or pass --no-tensorboard")
            return cls()
        before = sorted(glob.glob(os.path.join(log_dir, EVENT_FILES)))
        # TensorBoard reads a folder's event files in the order of their names, which start with a
        # second: this run's file must come after every file it continues or replaces, or their
        # start-of-run marker would hide its steps. Hence a file of our own (SummaryWriter names
        # its file by the clock alone, and a resume within the same second would sort first).
        stamp = max([int(time.time())] + [_stamp(p) + 1 for p in before])
        path = os.path.join(log_dir, f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}.0")
        try:
            os.makedirs(log_dir, exist_ok=True)
            records = RecordWriter(open(path, "xb"))
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):  # something in the way
                raise UserError(f"cannot write TensorBoard events to {log_dir} ({one_line(e)}); "
                                "free that path, or pass --no-tensorboard") from None
            raise write_failure(path, e) from None  # a full disk, say: as for every other file
        log = cls((records, Event, scalar), stale=before if global_step == 0 else [])
        log.path = path
        log._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        # TensorBoard hides the events of steps >= this from the files before it: what a stopped
        # or killed run logged after its checkpoint (all of it, for a new run in a used folder).
        log._write(Event(wall_time=time.time(), step=global_step + 1 if global_step else 0,
                         session_log=SessionLog(status=SessionLog.START)))
        log.flush()
        return log

    def _write(self, event) -> None:
        self.writer[0].write(event.SerializeToString())

    def _scalars(self, scalars: dict, global_step: int) -> None:
        _, Event, scalar = self.writer
        now = time.time()
        try:
            for tag, value in scalars.items():
                self._write(Event(wall_time=now, step=global_step, summary=scalar(tag, float(value))))
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        """A full disk, say: the training goes on (a checkpoint that cannot be written says so itself)."""
        note(f"cannot write TensorBoard events to {self.path} ({one_line(e)}); this run logs no more")
        self.close()

    def step(self, global_step: int, losses, reg) -> None:
        """Every STEP_EVERY steps: the step's loss, cross entropy and each regularized layer's
        λ-weighted term. `losses`: the step's (loss, ce, reg) tensor; `reg`: the regularizer or None."""
        if self.writer is None or global_step % STEP_EVERY:
            return
        loss, ce, _ = losses.tolist()
        scalars = {"step/loss": loss, "step/ce_loss": ce}
        if reg is not None:
            lambdas = reg.lambdas
            scalars.update({f"step/reg_{name}": lambdas[name] * float(term) for name, term in reg.last.items()})
        self._scalars(scalars, global_step)

    def epoch(self, global_step: int, row: dict, test_acc: float | None, regularized: bool) -> None:
        """A finished epoch's row of the history, at the step that ended it."""
        if self.writer is None:
            return
        scalars = {"epoch": row["epoch"], "loss/train": row["train_loss"], "loss/ce": row["ce_loss"],
                   "accuracy/train": row["train_acc"], "accuracy/val": row["val_acc"],
                   "lr": row["lr"], "time/epoch_s": row["epoch_time_s"]}
        if regularized:
            scalars["loss/reg"] = row["reg_loss"]
        if test_acc is not None:  # the protocol's test figure: the model of the best validation so far
            scalars["accuracy/test_at_best_val"] = test_acc
        for key, value in row.items():
            if key.startswith("intra_var_"):
                scalars[f"steadiness/{key[len('intra_var_'):]}"] = value
        self._scalars(scalars, global_step)

    def flush(self) -> None:
        """Before a checkpoint: every event up to it is on disk (see the module's docstring)."""
        if self.writer is None:
            return
        try:
            self.writer[0].flush()
        except OSError as e:
            self._give_up(e)

    def commit(self) -> None:
        """The run has its first checkpoint: event files an earlier attempt left in its folder (one
        killed before its first checkpoint) can go. (A run that --overwrite replaces takes its
        tb/ with it when it is set aside, nsr/train/outdir.py.)"""
        for path in self.stale:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self.stale = []

    def close(self) -> None:
        if self.writer is not None:
            records, self.writer = self.writer[0], None
            try:
                records.close()
            except OSError:
                pass
