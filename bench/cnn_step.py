"""CPU step time of CIFAR ResNet-18 with NSR on `fc` divided by the time without it.

    python bench/cnn_step.py [--rounds 5] [--steps 5] [--warmup 3] [--batch 32] [--check]

Both variants are SGD (lr 0.1, momentum 0.9) on a fixed random batch, each with its own copy of
the same initial model. Each round runs `steps` pairs of back-to-back steps, one per variant,
alternating which goes first, so drift in machine load hits both alike. Reported: the median step
time of each variant over all timed steps, their ratio, and the median over pairs of the
per-pair ratio (the figure least moved by other processes). Target: ratio <= 1.02.
Last, the NSR term's own cost (forward + backward on the logits alone), which load hardly moves.
--check exits 1 when the paired ratio is above the target.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.resnet_cifar import resnet18_cifar  # noqa: E402
from nsr import NeuronSteadiness  # noqa: E402

TARGET = 1.02


def make_step(model, reg):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg(y)
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(step, x, y, n):
    times, loss = [], torch.zeros(())
    for _ in range(n):
        t0 = time.perf_counter()
        loss = step(x, y)
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError("loss became non-finite during the benchmark")
    return times


def nsr_term_cost(batch, classes, n=200):
    """Median seconds of reg(y) plus its backward alone, on batch x classes logits (a leaf)."""
    stand_in = torch.nn.Sequential(OrderedDict(fc=torch.nn.Identity())).train()
    reg = NeuronSteadiness(stand_in, {"fc": 0.5}, num_classes=classes, queue_batches=1)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(batch, classes, generator=g, requires_grad=True)
    y = torch.randint(0, classes, (batch,), generator=g)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        stand_in(logits)
        reg(y).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--check", action="store_true", help=f"exit 1 if the ratio exceeds {TARGET}")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base_model = resnet18_cifar(num_classes=10).train()
    nsr_model = copy.deepcopy(base_model)
    reg = NeuronSteadiness(nsr_model, {"fc": 0.5}, num_classes=10, queue_batches=1)
    variants = {"baseline": make_step(base_model, None), "nsr": make_step(nsr_model, reg)}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    for step in variants.values():
        time_steps(step, x, y, args.warmup)

    times = {name: [] for name in variants}
    paired = []  # nsr / baseline for each pair of back-to-back steps
    for r in range(args.rounds):
        for i in range(args.steps):
            order = list(variants) if (r + i) % 2 == 0 else list(reversed(variants))
            pair = {name: time_steps(variants[name], x, y, 1)[0] for name in order}
            for name, t in pair.items():
                times[name].append(t)
            paired.append(pair["nsr"] / pair["baseline"])
        last = slice(-args.steps, None)
        print(f"round {r + 1}/{args.rounds}: baseline {statistics.median(times['baseline'][last]) * 1e3:7.1f} ms"
              f"  nsr {statistics.median(times['nsr'][last]) * 1e3:7.1f} ms"
              f"  paired ratio {statistics.median(paired[last]):.3f}", flush=True)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["nsr"] / med["baseline"]
    paired_ratio = statistics.median(paired)
    print(f"ResNet-18 CIFAR, batch {args.batch}, SGD momentum 0.9, CPU, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps per variant after {args.warmup} warm-up steps")
    print(f"median step time  baseline: {med['baseline'] * 1e3:.1f} ms   NSR(fc, lambda 0.5, K=1): "
          f"{med['nsr'] * 1e3:.1f} ms")
    print(f"ratio NSR / baseline: {ratio:.3f} (of medians), {paired_ratio:.3f} (median of paired steps); "
          f"target <= {TARGET}: {'met' if paired_ratio <= TARGET else 'NOT met'}")
    term = nsr_term_cost(args.batch, 10)
    print(f"NSR term alone (forward + backward on {args.batch} x 10 logits): {term * 1e3:.3f} ms "
          f"= {term / med['baseline'] * 100:.3f}% of a baseline step")
    if args.check and paired_ratio > TARGET:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
