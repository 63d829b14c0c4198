"""What a run is made of: the runtime (device, rank), the model (checked against the data), the
optimizer and scheduler, and the regularizer. The engine (nsr/engine.py) puts them together."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models import build_model, is_mlp
from nsr.center_loss import CenterLoss
from nsr.regularizer import NeuronSteadiness

from .config import Config
from .data import channels_last
from .errors import UserError, one_line


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
    want = cfg.device  # one this machine can use: config.validate checked it
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and ":" in want:
        raise UserError(f"--device {want} under torchrun: each process uses the GPU of its LOCAL_RANK; "
                        "pass --device cuda")
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if want.startswith("cuda") else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Runtime(device, rank, world)
    try:
        return Runtime(torch.device(want))
    except RuntimeError:
        raise UserError(f"unknown device {cfg.device!r}; use auto, cpu, cuda or cuda:N") from None


def set_cpu_threads(cfg: Config, device: torch.device) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and is_mlp(cfg.model):
        # An MLP's matrices are too small to split: one thread is faster, and far faster when
        # other processes compete for the cores (OpenMP threads then wait on each other).
        torch.set_num_threads(1)


def build_checked_model(cfg: Config, num_classes: int, in_shape: tuple) -> nn.Module:
    """The model, after one dry forward of two zero samples: a model that cannot take this data
    (ResNet-50 on 1-channel images, VGG on 8x8) fails here in one line, not in the first step.
    The same forward finds NSR settings that would silently do nothing."""
    try:
        model = build_model(cfg.model, num_classes, in_shape, dropout=cfg.dropout)
    except ValueError as e:
        raise UserError(f"model {cfg.model} cannot be built for {cfg.dataset}: {one_line(e)}") from None
    outputs, names = {}, dict(model.named_modules())
    hooks = [names[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n in (cfg.regularized_layers if cfg.regularizer != "none" else []) if n in names]
    model.eval()
    try:
        model(torch.zeros(2, *in_shape))
    except RuntimeError as e:
        raise UserError(f"model {cfg.model} cannot take {cfg.dataset}'s inputs of shape {tuple(in_shape)} "
                        f"({one_line(e, 160)}); choose a model for this data set") from None
    finally:
        for hook in hooks:
            hook.remove()
    for name, out in outputs.items():
        if torch.is_tensor(out) and not out.requires_grad:
            what = "NSR" if cfg.regularizer == "nsr" else "center-loss"
            raise UserError(f"{what} layer {name!r} has no trainable parameters before it (its output is "
                            f"the input data), so {what} would change nothing; choose a later layer")
    if cfg.regularizer == "nsr" and cfg.per_channel and outputs and all(o.dim() <= 2 for o in outputs.values()):
        raise UserError(f"per_channel averages N x C x H x W outputs, but the NSR layers "
                        f"({', '.join(outputs)}) give N x D; drop --per-channel")
    return model.train()


def place_model(cfg: Config, model: nn.Module, rt: Runtime) -> tuple[nn.Module, nn.Module, bool]:
    """(model, net, channels_last): the model on rt.device, in NHWC where that is faster; `net` is
    what the loop calls, the model itself or, under torchrun, its DistributedDataParallel wrapper."""
    model, nhwc = model.to(rt.device), channels_last(cfg, rt.device)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if rt.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                  else None)
    return model, net, nhwc


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


def replay_schedule(cfg: Config, epochs: int) -> tuple[list[float], dict]:
    """The learning rates of epochs 1..epochs+1 under cfg's schedule (the optimizer's, then after
    each epoch's scheduler step), and the scheduler's state after `epochs` steps: replayed on a
    one-weight model, so it costs microseconds and is bit-for-bit what a run computes."""
    optimizer, scheduler = build_optimizer(cfg, nn.Linear(1, 1, bias=False))
    lrs = [optimizer.param_groups[0]["lr"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no training here
        for _ in range(epochs):
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
    return lrs, scheduler.state_dict()


def build_regularizer(cfg: Config, model: nn.Module, num_classes: int,
                      device: torch.device) -> NeuronSteadiness | CenterLoss | None:
    """NSR, center loss (same layers and lambdas) or None; both are called as reg(y) after the forward."""
    if cfg.regularizer == "none":
        return None  # vanilla: no hooks, no cost
    # The names as a list, so that the library refuses a layer named twice (a dict would merge
    # them); then each layer's λ (config.validate checked them by the library's rule).
    layers = cfg.regularized_layers
    try:
        if cfg.regularizer == "center":
            reg = CenterLoss(model, layers, num_classes=num_classes, alpha=cfg.center_alpha)
        else:
            reg = NeuronSteadiness(model, layers, num_classes=num_classes, queue_batches=cfg.queue_batches,
                                   active_only=cfg.active_only, per_channel=cfg.per_channel)
        reg.lambdas = dict(zip(layers, cfg.lambda_))
    except ValueError as e:
        raise UserError(f"{e} (regularized_layers in the config, or --regularized-layers)") from None
    return reg.to(device)


def amp_dtype(cfg: Config, device: torch.device):
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


@contextlib.contextmanager
def enough_memory():
    """A size the machine cannot hold (a huge --batch-size or --fake-size) is one line, not a
    traceback from the allocator."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, MemoryError) and not any(
                s in text for s in ("DefaultCPUAllocator", "not enough memory", "out of memory")):
            raise
        raise UserError(f"not enough memory ({type(e).__name__}: {text.strip()[:120]}); lower "
                        "--batch-size, --eval-batch-size, --queue-batches or --fake-size") from None
