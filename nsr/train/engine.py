"""The training engine shared by fdnn_vanilla.py, fdnn_nsr.py and cnn_nsr.py.

One loop for MLPs and CNNs, one process or many (torchrun). Per epoch: train, validate, test
only when validation improves (the reported test accuracy is the one at the best validation
epoch), write last.pt / best.pt / metrics.json (nsr/train/outdir.py owns the folder, and a run
holds its lock from start to end). A run can stop at any step (Ctrl-C, SIGTERM, a kill,
--max-steps) and `--resume` continues it bit for bit on CPU: every shuffle and augmentation draw
is a function of (seed, epoch, step) and the checkpoint holds the position inside the epoch with
the epoch's running sums. What a resumed run reports comes from its checkpoint, never from the
metrics.json it finds.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from .build import (
    Runtime,
    amp_dtype,
    build_checked_model,
    build_optimizer,
    build_regularizer,
    enough_memory,
    place_model,
    set_cpu_threads,
    setup_runtime,
)
from .checkpoint import (
    load_resumable,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from .state_checks import RunParts
from .config import Config, parse_args, to_dict
from .console import epoch_line, print_summary, progress
from .data import load_data
from .errors import RunInterrupted, UserError, run_cli
from .evaluation import SteadinessProbe, evaluate, watched_layers
from .fileio import WriteError
from .meters import EpochMeter, Position
from .outdir import OutputFolder, default_out
from .stopping import StopRequest
from .tblog import TensorBoardLog

__all__ = ["Runtime", "RunHooks", "Trainer", "evaluate", "train", "main"]


class RunHooks:
    """What a caller can attach to a run without the engine knowing it (the NNI trial link,
    nsr/search/trial.py, is one): each method does nothing here; a subclass overrides what it needs."""

    def configure(self, cfg: Config) -> None:
        """Called once with the parsed config, before the output folder is touched; may change it."""

    def epoch_end(self, row: dict) -> None:
        """Called on the main process with each finished epoch's row of metrics.json's history."""

    def run_end(self, metrics: dict) -> None:
        """Called on the main process with the final metrics of a run that trained to its end."""

    def tensorboard_dir(self, out: str) -> str:
        """Where the run's TensorBoard event files go."""
        return os.path.join(out, "tb")


STOP_SIGNALS = ("SIGINT", "SIGTERM")  # what StopRequest names


class TrainingDiverged(UserError):
    pass


class Interrupted(Exception):
    """Training stopped on a signal (its name is the message) at a step boundary."""


def _diverged_message(p: Position, since: int, saved_at: tuple[int, int] | None, last: str) -> str:
    where = f"step {p.step}" if p.step - since <= 1 else f"steps {since + 1}..{p.step}"
    if saved_at is None:
        kept = "no checkpoint of this run was written"
    else:
        epoch, step = saved_at
        kept = (f"the last good checkpoint {last} (" + (f"end of epoch {epoch}" if step == 0 else
                f"epoch {epoch + 1}, step {step}") + ") is kept")
    return (f"loss became NaN or infinite in epoch {p.epoch + 1}, {where}; {kept}; lower --lr or --lambda "
            "and start again with --overwrite (--resume needs the same settings)")


# ---------------------------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, folder: OutputFolder | None = None, hooks: RunHooks | None = None):
        self.cfg, self.rt, self.config_dict = cfg, rt, to_dict(cfg)
        self.hooks = hooks or RunHooks()
        self.folder = folder or OutputFolder(cfg.out, writer=rt.main)
        set_cpu_threads(cfg, rt.device)
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg, rt.device, rt.rank, rt.world)
        model = build_checked_model(cfg, self.data.num_classes, self.data.in_shape)
        self.model, self.net, self.channels_last = place_model(cfg, model, rt)
        self.reg = build_regularizer(cfg, self.net, self.data.num_classes, rt.device)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        self.amp_dtype = amp_dtype(cfg, rt.device)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.amp_dtype == torch.float16)
        self.pos, self.meter = Position(), EpochMeter(rt.device)
        self.probe = SteadinessProbe(self.model, watched_layers(self.model, cfg.regularized_layers, cfg.model),
                                     self.data.num_classes)
        self.tb = TensorBoardLog()  # off until _train_in opens it (a Trainer alone writes nothing)
        self.saved_at: tuple[int, int] | None = None   # (epoch, step) of the latest last.pt
        # How often the ranks agree on stopping and check the loss is finite: both read a device
        # value (a host sync on a GPU), so on GPUs only every 50 steps.
        self.check_every = 1 if rt.device.type == "cpu" else 50

    def done(self) -> bool:
        max_steps = self.cfg.max_steps
        return self.pos.epoch >= self.cfg.epochs or (max_steps is not None and self.pos.global_step >= max_steps)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.amp_dtype)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.net(xb)
            ce = (F.cross_entropy(logits, yb, label_smoothing=self.cfg.label_smoothing)
                  if self.cfg.label_smoothing else F.cross_entropy(logits, yb))
            reg_loss = self.reg(yb) if self.reg is not None else None
            loss = ce + reg_loss if reg_loss is not None else ce
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.meter.update(loss, ce, reg_loss, logits, yb)

    def train_epoch(self, stop: StopRequest | None = None, bar=None) -> str | None:
        """Train from pos.step to the end of the epoch: None there, else why it stopped inside it
        ("interrupted" or "max_steps")."""
        p, max_steps = self.pos, self.cfg.max_steps
        self.net.train()
        start, checked = time.perf_counter(), p.step
        try:
            for xb, yb in self.data.train.iterate(p.epoch, p.step):
                self.train_step(xb, yb)
                p.step, p.global_step = p.step + 1, p.global_step + 1
                self.tb.step(p.global_step, self.meter.last, self.reg)
                if bar is not None:
                    bar.update(1)
                out_of_steps = max_steps is not None and p.global_step >= max_steps
                at_end = p.step == len(self.data.train)
                if out_of_steps or at_end or p.step % self.check_every == 0:
                    if self._agree_to_stop(stop, checked):
                        return "interrupted"
                    checked = p.step
                if out_of_steps and not at_end:
                    return "max_steps"
            return None
        finally:
            p.epoch_time_s += time.perf_counter() - start

    def _agree_to_stop(self, stop: StopRequest | None, since: int) -> bool:
        """True if any rank was asked to stop. Under DDP each rank sees Ctrl-C at its own time; one
        that left the loop alone would leave the others waiting in the next gradient all-reduce.
        So the ranks all-reduce (MAX) [stop, loss not finite] at the same steps: two numbers,
        cheap next to the gradients' all-reduce, and one sync with the finiteness check."""
        requested = stop is not None and stop.requested
        if self.rt.world == 1:
            stop_any, diverged = requested, not bool(self.meter.finite())
        else:
            # which signal: 0 none, 1 SIGINT, 2 SIGTERM (the larger wins), so that every rank,
            # rank 0 that writes metrics.json's stopped_by included, names the one that came
            signal_code = STOP_SIGNALS.index(stop.signal_name) + 1 if requested else 0
            flags = torch.stack((torch.tensor(float(signal_code), device=self.rt.device),
                                 (~self.meter.finite()).float()))
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop_any, diverged = flags.tolist()
            if stop_any and stop is not None and stop.signal_name is None:
                stop.signal_name = STOP_SIGNALS[int(stop_any) - 1]
        if diverged:
            raise TrainingDiverged(_diverged_message(self.pos, since, self.saved_at, self.folder.file("last.pt")))
        return bool(stop_any)

    def validate(self, test_if_better: bool = True) -> dict:
        """Validation accuracy; the test accuracy too when validation improved on the best."""
        start = time.perf_counter()
        val, val5, steadiness = evaluate(self, self.data.val, self.probe)
        result = {"val_acc": val, "val_top5_acc": val5, **steadiness}
        # The original code keeps the latest epoch that ties the best (>=); ours by default the first.
        tie = self.cfg.best_on_tie == "latest" and val == self.pos.best_val_acc
        if val > self.pos.best_val_acc or tie or not test_if_better:
            result["test_acc"], result["test_top5_acc"], _ = evaluate(self, self.data.test)
        self.pos.eval_time_s += time.perf_counter() - start
        return result

    def end_epoch(self) -> dict:
        p = self.pos
        result = self.validate()
        row = {"epoch": p.epoch + 1, **self.meter.summary(), "val_acc": result["val_acc"],
               "val_top5_acc": result["val_top5_acc"], "lr": self.optimizer.param_groups[0]["lr"],
               "epoch_time_s": p.epoch_time_s, **{k: v for k, v in result.items() if k.startswith("intra_var_")}}
        p.history.append(row)
        p.train_time_s += p.epoch_time_s
        p.epoch, p.step, p.epoch_time_s = p.epoch + 1, 0, 0.0
        self.meter.reset()
        self.scheduler.step()
        if "test_acc" in result:
            p.best_val_acc, p.best_epoch = result["val_acc"], p.epoch
            p.test_acc, p.test_top5_acc = result["test_acc"], result["test_top5_acc"]
            self.save("best.pt")
        self.tb.epoch(p.global_step, row, p.test_acc, self.reg is not None)
        self.save("last.pt")
        self.write_metrics(finished=False)
        if self.rt.main:
            self.hooks.epoch_end(row)
        return row

    def fit(self, stop: StopRequest) -> dict:
        cfg, p = self.cfg, self.pos
        show = not cfg.quiet and self.rt.main
        start = p.global_step
        while not self.done():
            bar = progress(show, len(self.data.train), p.epoch, cfg.epochs, p.step)
            try:
                stopped = self.train_epoch(stop, bar)
            finally:
                if bar is not None:
                    bar.close()
            if stopped == "interrupted":
                raise Interrupted(stop.signal_name)
            if stopped == "max_steps":  # the checkpoint keeps the epoch open; the report shows it
                break
            row = self.end_epoch()
            if show and bar is None:
                print(epoch_line(row, cfg.epochs), flush=True)
        partial = None
        if p.step > 0:  # an epoch left open by --max-steps (now, or by the run resumed here)
            if p.global_step > start:
                self.save("last.pt")
            partial = {"epoch": p.epoch + 1, "step": p.step, "of": len(self.data.train),
                       **self.meter.summary(), **self.validate(test_if_better=False)}
        return self.write_metrics(finished=p.epoch >= cfg.epochs, partial=partial)

    # -- checkpoints and reports
    def parts(self) -> RunParts:
        """What a checkpoint holds of this run and is checked against."""
        return RunParts(self.cfg, self.config_dict, self.rt.world, self.model, self.optimizer, self.scheduler,
                        self.scaler, self.reg, len(self.data.train), self.data.train.num_samples)

    def save(self, name: str) -> None:
        if name == "last.pt":
            self.tb.flush()  # what was logged up to this checkpoint is on disk before it
        if self.rt.main:
            save_checkpoint(training_state(self.parts(), self.pos, self.meter), self.folder.file(name))
        if name == "last.pt":
            self.saved_at = (self.pos.epoch, self.pos.step)
            self.folder.commit()
            self.tb.commit()

    def restore(self, path: str, state: dict) -> None:
        self.pos = restore_training_state(self.parts(), self.meter, path, state)
        self.saved_at = (self.pos.epoch, self.pos.step)

    def write_metrics(self, finished: bool, partial: dict | None = None) -> dict:
        m = run_metrics(self, finished, partial)
        self.folder.write_metrics(m)
        return m


def run_metrics(trainer: Trainer, finished: bool, partial: dict | None = None) -> dict:
    """What metrics.json holds. `finished`: every epoch trained; `stopped_by`: "max_steps" when
    --max-steps ended the run before that, "SIGINT"/"SIGTERM" for a signal (set by _interrupted);
    `partial`: the report of an epoch that --max-steps stopped inside."""
    p, cfg = trainer.pos, trainer.cfg
    regularized = cfg.regularizer != "none"
    used = to_dict(cfg)  # the settings the run reads; a regularizer's others are null (or [])
    test_acc, test_top5 = p.test_acc, p.test_top5_acc  # None (null) until an epoch has finished
    stopped_by = None
    if finished is False and cfg.max_steps is not None and p.global_step >= cfg.max_steps:
        stopped_by = "max_steps"
    return {"model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
            "regularizer": cfg.regularizer,
            "regularized_layers": cfg.regularized_layers if regularized else [], "lambda": cfg.lambda_ if regularized else [],
            "queue_batches": used.get("queue_batches"), "center_alpha": used.get("center_alpha"),
            "label_smoothing": cfg.label_smoothing, "dropout": cfg.dropout,
            "epochs": len(p.history), "num_params": sum(t.numel() for t in trainer.model.parameters()),
            "best_epoch": p.best_epoch, "best_val_acc": p.best_val_acc, "test_acc": test_acc,
            "test_error": None if test_acc is None else 100.0 - test_acc, "test_top5_acc": test_top5,
            "test_top5_error": None if test_top5 is None else 100.0 - test_top5,
            "train_time_s": p.train_time_s + p.epoch_time_s,
            "eval_time_s": p.eval_time_s, "global_steps": p.global_step,
            "device": str(trainer.rt.device), "world_size": trainer.rt.world, "finished": finished,
            "stopped_by": stopped_by, "partial_epoch": partial, "history": p.history}


# ---------------------------------------------------------------------------------- entry

def train(cfg: Config, hooks: RunHooks | None = None) -> dict:
    """Run one training job as configured; returns the final metrics."""
    hooks = hooks or RunHooks()
    rt = setup_runtime(cfg)
    hooks.configure(cfg)
    cfg.out = cfg.out or default_out(cfg.model, cfg.dataset, cfg.regularizer, cfg.seed)
    folder = OutputFolder(cfg.out, writer=rt.main)
    try:
        take_folder(folder, rt)
        return _train_in(folder, cfg, rt, hooks)
    finally:
        folder.release()


def take_folder(folder: OutputFolder, rt: Runtime) -> None:
    """Rank 0 takes the folder's lock and repairs what a killed run left; every rank then reads
    the folder as repaired. Under torchrun the others learn from rank 0 (a broadcast) whether it
    got the lock, so that a refused start ends every rank instead of leaving them waiting."""
    failure = None
    if rt.main:
        try:
            folder.acquire()
            folder.repair()
        except UserError as e:
            failure = e
    if rt.world > 1:
        refused = torch.tensor([float(failure is not None)], device=rt.device)
        dist.broadcast(refused, 0)
        if refused.item() and not rt.main:
            raise UserError(f"rank {rt.rank}: rank 0 could not take the output folder {folder.path}")
    if failure is not None:
        raise failure


def _train_in(folder: OutputFolder, cfg: Config, rt: Runtime, hooks: RunHooks) -> dict:
    resume_from = folder.prepare(cfg.resume, cfg.overwrite)
    # Before any data loads: a damaged checkpoint or a changed setting fails in seconds.
    state = load_resumable(resume_from, to_dict(cfg), rt.world, rt.device) if resume_from else None
    with enough_memory():
        trainer = Trainer(cfg, rt, folder, hooks)
    if state is not None:
        trainer.restore(resume_from, state)
    try:
        folder.begin(fresh=state is None, config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if cfg.tensorboard and rt.main:  # only rank 0 writes
            trainer.tb = TensorBoardLog.open(hooks.tensorboard_dir(cfg.out), trainer.pos.global_step)
        with StopRequest() as stop, enough_memory():
            try:
                metrics = trainer.fit(stop)
            except Interrupted as e:
                stop.honoring = True  # a further signal must not cut the save short (SIGKILL still can)
                raise _interrupted(trainer, e.args[0]) from None
    except RunInterrupted:
        raise
    except BaseException as e:
        if folder.abandon() and isinstance(e, UserError):
            raise type(e)(f"{e}; the previous run in {cfg.out} is kept as it was") from None
        if isinstance(e, WriteError):
            raise WriteError(f"{e}; {_kept(trainer)}") from None
        raise
    finally:
        trainer.tb.close()
    if rt.main:
        hooks.run_end(metrics)
        print_summary(metrics, cfg.out)
    return metrics


def _kept(trainer: Trainer) -> str:
    """What a run that cannot go on leaves to resume from."""
    if trainer.saved_at is None:
        return (f"no checkpoint of this run was written, and {trainer.folder.path} is as the run found it: "
                "run the same command again once it can write")
    epoch, step = trainer.saved_at
    where = f"end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
    return f"{trainer.folder.file('last.pt')} ({where}) is intact: continue with --resume once it can write"


def _interrupted(trainer: Trainer, signal_name: str | None) -> RunInterrupted:
    """Ctrl-C or SIGTERM: save the exact position, or, before the first checkpoint of an
    --overwrite run, put the replaced run back. `signal_name`: None on a rank that stopped
    because another one was signalled."""
    p, rt, folder = trainer.pos, trainer.rt, trainer.folder
    what = "interrupted" if signal_name in ("SIGINT", None) else f"stopped by {signal_name}"
    where = f"{what} in epoch {p.epoch + 1} at step {p.step}"
    if folder.replacing:  # stopped before its first checkpoint: the run it replaces goes back
        folder.abandon()
        return RunInterrupted(f"{where}, before the first checkpoint; the previous run in "
                              f"{folder.path} is kept as it was")
    trainer.save("last.pt")
    metrics = run_metrics(trainer, finished=False)
    folder.write_metrics({**metrics, "stopped_by": signal_name})
    if not rt.main:  # rank 0 saves for all ranks
        return RunInterrupted(f"rank {rt.rank}: {where}")
    return RunInterrupted(f"{where}; saved {folder.file('last.pt')}; continue with --resume")


def main(default_config: str | None = None, description: str = "", argv: list[str] | None = None,
         hooks: RunHooks | None = None, fixed: dict | None = None) -> None:
    """Entry point of the scripts: parse, train, and turn user errors into one line. `fixed`:
    settings the script decides (see config.parse_args)."""
    def run():
        cfg = parse_args(argv, default_config=default_config, description=description, fixed=fixed)
        try:
            train(cfg, hooks)
        finally:
            if dist.is_available() and dist.is_initialized():
                # Free the trainer's DDP wrapper, which holds the group, first: a group still held
                # is torn down at interpreter exit, where gloo's threads can abort the process.
                gc.collect()
                dist.destroy_process_group()

    run_cli(run)
