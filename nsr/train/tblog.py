"""TensorBoard event files of a run (torch.utils.tensorboard), written while it trains.

    tensorboard --logdir runs          # every run under runs/, side by side

On by default when the `tensorboard` package is installed (`tensorboard: false` in the YAML or
`--no-tensorboard` turns it off); without the package a run says so in one line and trains on.
Only rank 0 writes. The files go into OUT/tb/, or where the engine's hooks say (an NNI trial:
$NNI_OUTPUT_DIR/tensorboard, where NNI's web UI looks).

One x axis for every tag, the optimizer step (as Lightning does): each epoch's figures sit at the
step that ends the epoch, and every STEP_EVERY steps the step's own losses are logged. A single
axis is what makes resuming exact: a resumed run opens its writer with purge_step = the
checkpoint's step + 1, and TensorBoard then drops whatever a stopped or killed run had logged
after that checkpoint, on every tag at once. Everything logged up to a checkpoint is flushed
before the checkpoint is written, so nothing the resumed run will not log again can be lost.
"""

from __future__ import annotations

import glob
import os
import sys

from .errors import UserError, one_line

STEP_EVERY = 50  # steps between per-step scalars: one read of the step's losses (a host sync on a GPU)
EVENT_FILES = "events.out.tfevents.*"


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


class TensorBoardLog:
    """The writer of one run; every method does nothing when logging is off (no writer)."""

    def __init__(self, writer=None, stale: list[str] | None = None):
        self.writer = writer
        self.own: list[str] = []     # the event file this writer created
        self.stale = stale or []     # event files of an earlier run this one replaces

    @classmethod
    def open(cls, log_dir: str, enabled: bool, main: bool, global_step: int) -> "TensorBoardLog":
        """A writer in `log_dir` for a run that starts (or resumes) after `global_step` steps."""
        if not (enabled and main):
            return cls()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            note("tensorboard is not installed, so this run writes no TensorBoard events; "
                 "pip install tensorboard, or pass --no-tensorboard")
            return cls()
        before = set(glob.glob(os.path.join(log_dir, EVENT_FILES)))
        try:
            # purge_step: TensorBoard hides the events of steps >= it from the files written
            # before (a stopped run's steps after its checkpoint; all of them for a new run).
            writer = SummaryWriter(log_dir, purge_step=global_step + 1 if global_step else 0)
        except OSError as e:
            raise UserError(f"cannot write TensorBoard events to {log_dir} ({one_line(e)}); "
                            "free that path, or pass --no-tensorboard") from None
        log = cls(writer, stale=sorted(before) if global_step == 0 else [])
        log.own = sorted(set(glob.glob(os.path.join(log_dir, EVENT_FILES))) - before)
        return log

    def step(self, global_step: int, losses, reg) -> None:
        """Every STEP_EVERY steps: the step's loss, cross entropy and each regularized layer's
        λ-weighted term. `losses`: the step's (loss, ce, nsr) tensor; `reg`: the regularizer or None."""
        if self.writer is None or global_step % STEP_EVERY:
            return
        loss, ce, _ = losses.tolist()
        scalars = {"step/loss": loss, "step/ce_loss": ce}
        if reg is not None:
            lambdas = reg.lambdas
            scalars.update({f"step/nsr_{name}": lambdas[name] * float(term) for name, term in reg.last.items()})
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)

    def epoch(self, global_step: int, row: dict, test_acc: float | None, regularized: bool) -> None:
        """A finished epoch's row of the history, at the step that ended it."""
        if self.writer is None:
            return
        scalars = {"epoch": row["epoch"], "loss/train": row["train_loss"], "loss/ce": row["ce_loss"],
                   "accuracy/train": row["train_acc"], "accuracy/val": row["val_acc"],
                   "lr": row["lr"], "time/epoch_s": row["epoch_time_s"]}
        if regularized:
            scalars["loss/nsr"] = row["nsr_loss"]
        if test_acc is not None:  # the protocol's test figure: the model of the best validation so far
            scalars["accuracy/test_at_best_val"] = test_acc
        for key, value in row.items():
            if key.startswith("intra_var_"):
                scalars[f"steadiness/{key[len('intra_var_'):]}"] = value
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)

    def flush(self) -> None:
        """Before a checkpoint: every event up to it is on disk (see the module's docstring)."""
        if self.writer is not None:
            self.writer.flush()

    def commit(self) -> None:
        """The run has its first checkpoint: the event files of the run it replaced can go."""
        for path in self.stale:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self.stale = []

    def discard(self) -> None:
        """The run failed before its first checkpoint and the run it replaced is put back: remove
        this run's event file, so that TensorBoard shows the earlier run's curves unhidden."""
        self.close()
        for path in self.own:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self.own = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
