"""The training engine shared by fdnn_vanilla.py, fdnn_nsr.py and cnn_nsr.py.

One loop for MLPs and CNNs, one process or many (torchrun). Per epoch: train, validate, test
only when validation improves (the reported test accuracy is the one at the best validation
epoch), write last.pt / best.pt / metrics.json. A run can stop at any step (Ctrl-C, a kill)
and `--resume` continues it bit for bit on CPU: every shuffle and augmentation draw is a
function of (seed, epoch, step) and the checkpoint holds the position inside the epoch.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from . import nni_trial
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, apply_overrides, parse_args, to_dict, validate
from .data import channels_last, load_data
from .errors import RunInterrupted, UserError, run_cli
from .regularizer import NeuronSteadiness

# Keys that may differ between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = {"epochs", "max_steps", "out", "device", "workers", "quiet", "resume",
                     "overwrite", "data_dir", "eval_batch_size"}
HISTORY_KEYS = ["epoch", "train_loss", "ce_loss", "nsr_loss", "train_acc", "val_acc", "val_top5_acc",
                "lr", "epoch_time_s"]


class TrainingDiverged(UserError):
    pass


class Interrupted(Exception):
    pass


# ---------------------------------------------------------------------------------- set-up

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: Config) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {cfg.device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if want.startswith("cuda"):
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Runtime(device, rank, world)
    try:
        device = torch.device(want)
    except RuntimeError:
        raise UserError(f"unknown device {cfg.device!r}; use auto, cpu, cuda or cuda:N") from None
    return Runtime(device)


def set_cpu_threads(cfg: Config, device: torch.device) -> None:
    from models import is_mlp

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and is_mlp(cfg.model):
        # An MLP's matrices are too small to split: one thread is faster, and far faster when
        # other processes compete for the cores (OpenMP threads then wait on each other).
        torch.set_num_threads(1)


def default_out(cfg: Config) -> str:
    kind = "nsr" if cfg.nsr else "vanilla"
    return os.path.join("runs", f"{cfg.model}-{cfg.dataset}-{kind}-s{cfg.seed}")


def prepare_out(cfg: Config, rt: Runtime) -> str | None:
    """Check the output folder before any training: writable, and no finished run overwritten.
    Returns the checkpoint to resume from, if any."""
    out = cfg.out
    last = os.path.join(out, "last.pt")
    metrics_path = os.path.join(out, "metrics.json")
    finished = _read_json(metrics_path).get("finished", False) if os.path.isfile(metrics_path) else False
    if not cfg.overwrite and not cfg.resume:
        if finished:
            raise UserError(f"{out} already holds a finished run; pass --overwrite to replace it, "
                            "or choose another --out")
        if os.path.isfile(last):
            raise UserError(f"{out} holds an unfinished run; pass --resume to continue it, "
                            "or --overwrite to start again")
    if rt.main:
        created = _missing_dirs(out)
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test.{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to output folder {out} ({e.strerror}); choose another --out") from None
        finally:
            for folder in created:  # made again by start_out once the run is known to start
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
    if cfg.resume and os.path.isfile(last):
        return last
    return None


def _missing_dirs(path: str) -> list[str]:
    """The folders os.makedirs(path) would create, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def start_out(cfg: Config, rt: Runtime) -> None:
    """Once data, model and NSR layers have loaded: make the output folder and, with --overwrite,
    only now remove the previous run (a run that fails to start leaves it as it was)."""
    if rt.main:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.overwrite and not cfg.resume:
            for name in ("last.pt", "best.pt", "metrics.json", "history.csv"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(cfg.out, name))


def load_resumable(path: str, cfg: Config, device) -> dict:
    """Read a checkpoint and check that it continues this run (same settings)."""
    state = load_checkpoint(path, map_location=device)
    saved = state.get("config", {})
    now = to_dict(cfg)
    changed = [k for k in now if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed[:4])
        raise UserError(f"cannot resume {path}: settings differ from the saved run ({diffs}); "
                        "resume with the same settings or start a new --out")
    return state


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_optimizer(cfg: Config, model: nn.Module):
    params = model.parameters()
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
    elif cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    return opt, sched


def build_regularizer(cfg: Config, model: nn.Module, num_classes: int) -> NeuronSteadiness | None:
    if not cfg.nsr:
        return None  # vanilla: no hooks, no cost
    try:
        return NeuronSteadiness(model, dict(zip(cfg.nsr_layers, cfg.lambda_)), num_classes=num_classes,
                                queue_batches=cfg.queue_batches, active_only=cfg.active_only,
                                per_channel=cfg.per_channel)
    except ValueError as e:
        raise UserError(f"{e}; set nsr_layers in the config or --nsr-layers") from None


def _amp_dtype(cfg: Config, device: torch.device):
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


# ---------------------------------------------------------------------------------- the loop

@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0                     # current epoch (0-based)
    step: int = 0                      # next step inside the epoch
    global_step: int = 0
    history: list = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = -1
    test_acc: float | None = None
    test_top5_acc: float | None = None
    train_time_s: float = 0.0
    epoch_time_s: float = 0.0          # time spent in the current epoch so far
    seen: int = 0                      # training samples of the current epoch so far
    sums: dict = field(default_factory=dict)  # running sums of the current epoch (on the device)


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        set_cpu_threads(cfg, rt.device)
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg, rt.device, rt.rank, rt.world)
        from models import build_model

        model = build_model(cfg.model, self.data.num_classes, self.data.in_shape).to(rt.device)
        self.channels_last = channels_last(cfg, rt.device)
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.num_params = sum(p.numel() for p in model.parameters())
        self.net = model
        if rt.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        self.reg = build_regularizer(cfg, self.net, self.data.num_classes)
        if self.reg is not None:
            self.reg.to(rt.device)
        self.optimizer, self.scheduler = build_optimizer(cfg, model)
        self.amp_dtype = _amp_dtype(cfg, rt.device)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.amp_dtype == torch.float16)
        self.pos = Position()
        self.interrupt = False

    # -- checkpoints
    def state(self) -> dict:
        p = self.pos
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "nsr": self.reg.state_dict() if self.reg is not None else {},
            "rng": rng_state(), "config": to_dict(self.cfg),
            "position": {"epoch": p.epoch, "step": p.step, "global_step": p.global_step,
                         "history": p.history, "best_val_acc": p.best_val_acc,
                         "best_epoch": p.best_epoch, "test_acc": p.test_acc,
                         "test_top5_acc": p.test_top5_acc,
                         "train_time_s": p.train_time_s, "epoch_time_s": p.epoch_time_s, "seen": p.seen,
                         "sums": {k: v.detach().cpu() for k, v in p.sums.items()}},
        }

    def save(self, name: str) -> None:
        if self.rt.main:
            save_checkpoint(self.state(), os.path.join(self.cfg.out, name))

    def restore(self, path: str, state: dict | None = None) -> None:
        if state is None:
            state = load_resumable(path, self.cfg, self.rt.device)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.reg is not None:
                self.reg.load_state_dict(state["nsr"])
            set_rng_state(state["rng"])
            pos = dict(state["position"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"checkpoint {path} does not fit this run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
        pos["sums"] = {k: v.to(self.rt.device) for k, v in pos["sums"].items()}
        self.pos = Position(**pos)

    # -- one epoch
    def _new_sums(self) -> dict:
        dev = self.rt.device
        # losses: sums of (loss, ce, nsr) x batch size; a NaN or inf anywhere stays in the sum,
        # so checking it now and then finds any non-finite step since the last check.
        return {"losses": torch.zeros(3, dtype=torch.float64, device=dev),
                "correct": torch.zeros((), dtype=torch.int64, device=dev)}

    def train_epoch(self, bar) -> bool:
        """Train from self.pos.step to the end of the epoch; False if max_steps stopped it early."""
        cfg, p, dev = self.cfg, self.pos, self.rt.device
        self.net.train()
        if not p.sums:
            p.sums = self._new_sums()
        s = p.sums
        no_nsr = torch.zeros((), device=dev)
        check_every = 1 if dev.type == "cpu" else 50  # on GPUs a finiteness check is a host sync
        autocast = (torch.autocast(dev.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        start = time.perf_counter()
        last_checked = p.step
        for xb, yb in self.data.train.iterate(p.epoch, p.step):
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = self.net(xb)
                ce = F.cross_entropy(logits, yb)
                nsr = self.reg(yb) if self.reg is not None else None
                loss = ce + nsr if nsr is not None else ce
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

            with torch.no_grad():  # few ops per step: on a small MLP each costs ~1 % of a step
                n = yb.shape[0]
                s["losses"].add_(torch.stack((loss, ce, nsr if nsr is not None else no_nsr)), alpha=n)
                s["correct"] += (logits.argmax(1) == yb).sum()
            p.seen += n
            p.step += 1
            p.global_step += 1
            if p.step - last_checked >= check_every or p.step == len(self.data.train):
                self._check_finite(last_checked)
                last_checked = p.step
            if bar is not None:
                bar.update(1)
                if p.step % 20 == 0:
                    bar.set_postfix(loss=f"{float(s['losses'][0]) / max(p.seen, 1):.4f}", refresh=False)
            if self.interrupt:
                self._check_finite(last_checked)
                p.epoch_time_s += time.perf_counter() - start
                raise Interrupted
            if cfg.max_steps is not None and p.global_step >= cfg.max_steps:
                p.epoch_time_s += time.perf_counter() - start
                return False
        p.epoch_time_s += time.perf_counter() - start
        return True

    def _check_finite(self, since_step: int) -> None:
        if not bool(torch.isfinite(self.pos.sums["losses"]).all()):
            where = (f"step {self.pos.step}" if self.pos.step - since_step <= 1
                     else f"steps {since_step + 1}..{self.pos.step}")
            last = os.path.join(self.cfg.out, "last.pt")
            good = (f"the last good checkpoint {last} (end of epoch {self.pos.epoch}) is kept"
                    if os.path.isfile(last) else "no checkpoint was written yet")
            raise TrainingDiverged(f"loss became NaN or infinite in epoch {self.pos.epoch + 1}, {where}; "
                                   f"{good}; lower --lr or --lambda and start again with --overwrite "
                                   "(--resume needs the same settings)")

    @torch.no_grad()
    def evaluate(self, batches) -> tuple[float, float]:
        """(top-1, top-5) accuracy in percent over `batches`, summed over all ranks."""
        model = self.model
        if self.rt.world > 1:
            # DDP keeps parameters equal, but BatchNorm running stats only as of the last forward:
            # every rank evaluates (and rank 0 saves) with rank 0's.
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.rt.device)  # top1, top5, count
        k = min(5, self.data.num_classes)
        autocast = (torch.autocast(self.rt.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        for xb, yb in batches.iterate(0):
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(xb)
            hits = logits.topk(k, dim=1).indices == yb[:, None]
            totals[0] += hits[:, 0].sum()
            totals[1] += hits.any(dim=1).sum()
            totals[2] += yb.shape[0]
        if self.rt.world > 1:
            dist.all_reduce(totals)
        model.train(was_training)
        top1, top5, count = totals.tolist()
        return 100.0 * top1 / max(count, 1.0), 100.0 * top5 / max(count, 1.0)

    # -- the run
    def fit(self) -> dict:
        cfg, p = self.cfg, self.pos
        show = not cfg.quiet and self.rt.main
        for epoch in range(p.epoch, cfg.epochs):
            if cfg.max_steps is not None and p.global_step >= cfg.max_steps:
                break
            p.epoch = epoch
            lr = self.optimizer.param_groups[0]["lr"]
            bar = _progress(show, len(self.data.train), epoch, cfg.epochs, p.step)
            try:
                completed = self.train_epoch(bar)
            finally:
                if bar is not None:
                    bar.close()
            t0 = time.perf_counter()
            val_acc, val_top5 = self.evaluate(self.data.val)
            improved = val_acc > p.best_val_acc
            if improved:
                p.best_val_acc, p.best_epoch = val_acc, epoch + 1
                p.test_acc, p.test_top5_acc = self.evaluate(self.data.test)
            count = max(p.seen, 1)
            loss_sum, ce_sum, nsr_sum = p.sums["losses"].tolist()
            p.epoch_time_s += time.perf_counter() - t0
            row = {"epoch": epoch + 1, "train_loss": loss_sum / count,
                   "ce_loss": ce_sum / count, "nsr_loss": nsr_sum / count,
                   "train_acc": 100.0 * int(p.sums["correct"]) / count, "val_acc": val_acc,
                   "val_top5_acc": val_top5, "lr": lr,
                   "epoch_time_s": p.epoch_time_s}
            p.history.append(row)
            p.train_time_s += p.epoch_time_s
            p.epoch, p.step, p.sums, p.seen, p.epoch_time_s = epoch + 1, 0, {}, 0, 0.0
            self.scheduler.step()
            if improved:
                self.save("best.pt")
            self.save("last.pt")
            self.write_metrics(finished=False)
            nni_trial.report_intermediate(val_acc)
            if show and bar is None:
                print(_epoch_line(row, cfg.epochs), flush=True)
            if not completed:
                break
        return self.write_metrics(finished=True)

    def metrics(self, finished: bool) -> dict:
        p, cfg = self.pos, self.cfg
        test_acc = p.test_acc if p.test_acc is not None else float("nan")
        test_top5 = p.test_top5_acc if p.test_top5_acc is not None else float("nan")
        return {"model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
                "nsr": cfg.nsr, "nsr_layers": cfg.nsr_layers if cfg.nsr else [],
                "lambda": cfg.lambda_ if cfg.nsr else [], "queue_batches": cfg.queue_batches,
                "epochs": len(p.history), "num_params": self.num_params, "best_epoch": p.best_epoch,
                "best_val_acc": p.best_val_acc, "test_acc": test_acc, "test_error": 100.0 - test_acc,
                "test_top5_acc": test_top5, "test_top5_error": 100.0 - test_top5,
                "train_time_s": p.train_time_s, "global_steps": p.global_step,
                "device": str(self.rt.device), "world_size": self.rt.world,
                "finished": finished, "history": p.history}

    def write_metrics(self, finished: bool) -> dict:
        m = self.metrics(finished)
        if self.rt.main:
            out = self.cfg.out
            _write_atomic(os.path.join(out, "metrics.json"), json.dumps(m, indent=2) + "\n")
            with open(os.path.join(out, "history.csv.tmp"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=HISTORY_KEYS)
                writer.writeheader()
                writer.writerows(m["history"])
            os.replace(os.path.join(out, "history.csv.tmp"), os.path.join(out, "history.csv"))
        return m


def _progress(show: bool, total: int, epoch: int, epochs: int, start: int):
    if not show or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                dynamic_ncols=True)


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f} (ce {row['ce_loss']:.4f}, "
            f"nsr {row['nsr_loss']:.4f})  train {row['train_acc']:.2f}%  val {row['val_acc']:.2f}%  "
            f"{row['epoch_time_s']:.1f}s")


# ---------------------------------------------------------------------------------- entry

def apply_trial_parameters(cfg: Config) -> None:
    """Under an NNI trial, the tuner's parameters override the config."""
    params = nni_trial.get_trial_parameters()
    if not params:
        return
    params = dict(params)
    if "nsr_layer" in params:
        params["nsr_layers"] = [params.pop("nsr_layer")]
    lam = params.pop("lambda", None)
    apply_overrides(cfg, params, "NNI parameters")
    if lam is not None:
        apply_overrides(cfg, {"lambda": [lam] * len(cfg.nsr_layers) if not isinstance(lam, list) else lam},
                        "NNI parameters")
    validate(cfg)


def train(cfg: Config) -> dict:
    """Run one training job as configured; returns the final metrics."""
    rt = setup_runtime(cfg)
    apply_trial_parameters(cfg)
    if not cfg.out:
        cfg.out = default_out(cfg)
    resume_from = prepare_out(cfg, rt)
    if cfg.resume and resume_from is None and rt.main and not cfg.quiet:
        print(f"no checkpoint in {cfg.out}; starting from scratch", file=sys.stderr)
    # Before any data loads: a damaged checkpoint or a changed setting fails in seconds.
    state = load_resumable(resume_from, cfg, rt.device) if resume_from else None
    trainer = Trainer(cfg, rt)
    if resume_from:
        trainer.restore(resume_from, state)
        if trainer.pos.epoch >= cfg.epochs and _read_json(os.path.join(cfg.out, "metrics.json")).get("finished"):
            m = trainer.metrics(True)
            _print_summary(m, cfg, rt)
            return m
    start_out(cfg, rt)
    if rt.main:
        _write_atomic(os.path.join(cfg.out, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def on_sigint(signum, frame):
        if trainer.interrupt:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        trainer.interrupt = True

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    try:
        metrics = trainer.fit()
    except Interrupted:
        trainer.save("last.pt")
        trainer.write_metrics(finished=False)
        where = f"interrupted in epoch {trainer.pos.epoch + 1} at step {trainer.pos.step}"
        if not rt.main:  # rank 0 saves for all ranks
            raise RunInterrupted(f"rank {rt.rank}: {where}") from None
        raise RunInterrupted(f"{where}; saved {os.path.join(cfg.out, 'last.pt')}; "
                             "continue with --resume") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    nni_trial.report_final(metrics["best_val_acc"], metrics["test_acc"])
    _print_summary(metrics, cfg, rt)
    return metrics


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _print_summary(m: dict, cfg: Config, rt: Runtime) -> None:
    if rt.main:
        kind = f"NSR {dict(zip(m['nsr_layers'], m['lambda']))}" if m["nsr"] else "vanilla"
        print(f"{m['model']} {kind} on {m['dataset']}: test error {m['test_error']:.2f}% "
              f"(best val {m['best_val_acc']:.2f}% at epoch {m['best_epoch']}); {m['train_time_s']:.1f}s "
              f"training; outputs in {cfg.out}")


def main(default_config: str | None = None, defaults: dict | None = None, description: str = "",
         argv: list[str] | None = None) -> None:
    """Entry point of the scripts: parse, train, and turn user errors into one line."""
    def run():
        cfg = parse_args(argv, default_config=default_config, defaults=defaults, description=description)
        try:
            train(cfg)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    run_cli(run)
