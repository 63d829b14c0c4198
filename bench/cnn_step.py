"""CPU step time of CIFAR ResNet-18 with NSR on `fc` divided by the time without it.

    python bench/cnn_step.py [--rounds 5] [--steps 5] [--warmup 3] [--batch 32] [--threads N] [--check]

Both variants are SGD (lr 0.1, momentum 0.9) on a fixed random batch, each with its own copy of
the same initial model. Each round runs `steps` pairs of back-to-back steps, one per variant,
alternating which goes first, so drift in machine load hits both alike.

Reported for wall-clock time and for this process's CPU time (time.process_time, all threads):
the median step time of each variant, the ratio of those medians, and the median over pairs of
the per-pair ratio. On an idle machine the two agree; when other processes share the cores, wall
time swings by several x from step to step and CPU time is the steadier figure (with --threads 1
it is also free of OpenMP spin-waiting). Last, the NSR term's own cost (forward + backward on the
logits alone). Target: ratio <= 1.02. --check exits 1 when the paired CPU-time ratio is above it.
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
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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


def timed_step(step, x, y):
    """One step; returns {"wall": seconds, "cpu": seconds}."""
    start = {k: clock() for k, clock in CLOCKS.items()}
    loss = step(x, y)
    took = {k: clock() - start[k] for k, clock in CLOCKS.items()}
    if not torch.isfinite(loss):
        raise RuntimeError("loss became non-finite during the benchmark")
    return took


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
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if the paired CPU-time ratio exceeds {TARGET}")
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
        for _ in range(args.warmup):
            timed_step(step, x, y)

    times = {(v, k): [] for v in variants for k in CLOCKS}
    paired = {k: [] for k in CLOCKS}  # nsr / baseline for each pair of back-to-back steps
    for r in range(args.rounds):
        for i in range(args.steps):
            order = list(variants) if (r + i) % 2 == 0 else list(reversed(variants))
            pair = {name: timed_step(variants[name], x, y) for name in order}
            for k in CLOCKS:
                for name in variants:
                    times[name, k].append(pair[name][k])
                paired[k].append(pair["nsr"][k] / pair["baseline"][k])
        last = slice(-args.steps, None)
        print(f"round {r + 1}/{args.rounds}: " + "   ".join(
            f"{k} baseline {statistics.median(times['baseline', k][last]) * 1e3:7.1f} ms "
            f"nsr {statistics.median(times['nsr', k][last]) * 1e3:7.1f} ms "
            f"ratio {statistics.median(paired[k][last]):.3f}" for k in CLOCKS), flush=True)

    print(f"ResNet-18 CIFAR, batch {args.batch}, SGD momentum 0.9, CPU, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps per variant after {args.warmup} warm-up steps")
    result = {}
    for k in CLOCKS:
        base, nsr = statistics.median(times["baseline", k]), statistics.median(times["nsr", k])
        result[k] = statistics.median(paired[k])
        print(f"{k:>4} time: median step baseline {base * 1e3:8.1f} ms, NSR(fc, lambda 0.5, K=1) "
              f"{nsr * 1e3:8.1f} ms; ratio {nsr / base:.3f} (of medians), {result[k]:.3f} (median of pairs)")
    print(f"target <= {TARGET} (paired CPU-time ratio): {'met' if result['cpu'] <= TARGET else 'NOT met'}")
    term = nsr_term_cost(args.batch, 10)
    base_wall = statistics.median(times["baseline", "wall"])
    print(f"NSR term alone (forward + backward on {args.batch} x 10 logits): {term * 1e3:.3f} ms "
          f"= {term / base_wall * 100:.3f}% of a baseline step")
    if args.check and result["cpu"] > TARGET:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
