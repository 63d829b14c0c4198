"""How much does NSR add to a training step?  A script, not a test:

    .venv/bin/python bench/nsr_overhead.py [--rounds 40] [--steps 20] [--skip-resnet] [--threads N] [--clock cpu]

Each variant trains its own copy of the same model on the same fixed batches (forward, cross
entropy, backward, SGD step). Variants are interleaved round by round, each round timing `steps`
consecutive steps with time.perf_counter (--clock cpu: time.thread_time, the CPU time of this
thread, which other processes on a busy machine disturb less; use it with --threads 1). The
table shows per-step medians over rounds and the ratio to the plain step, and how many ops (aten
ops called from Python or autograd, counted with torch.profiler over one step) each variant adds
to the plain step.

Variants
  plain     cross entropy only
  nsr       cross entropy + NeuronSteadiness(model, {layer: lam}, C, queue_batches=K)(y); also on
            three MLP-4 layers at once
  floor     cross entropy + lam * mean((z - mu[y])**2) with mu a fixed tensor: the bare loss
            expression, i.e. what NSR costs with no memory at all
  ring      the same maths as nsr in plain public torch, about 20 lines (PlainNSR below): a ring of
            K per-batch class sums with the count as one more column, summed each step, then
            F.mse_loss; no checks. The reference nsr's cost is held to (within 5 %)
  original  the original code's approach: a Python list of the last K detached batches,
            torch.stack over it and a scatter-mean every step (MLP only)

Speed guards (checks, not targets): NSR at most 1.20x the plain step on MLP-4, 1.02x on ResNet-18,
and at most 1.05x the plain form's step (ring) on MLP-4.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import build_model  # noqa: E402
from nsr import NeuronSteadiness  # noqa: E402


def output_of(model, layer):
    """A forward hook storing `layer`'s output in a one-slot dict (for floor/original)."""
    box = {}
    dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: box.__setitem__("z", o))
    return box


class OriginalQueue:
    """The original implementation's memory: last K detached batches, re-stacked every step."""

    def __init__(self, num_classes, K):
        self.C, self.K, self.zs, self.ys = num_classes, K, [], []

    def __call__(self, z, y):
        z = z.flatten(1)
        self.zs.append(z.detach())
        self.ys.append(y)
        if len(self.zs) > self.K:
            self.zs.pop(0)
            self.ys.pop(0)
        Z = torch.stack(self.zs).flatten(0, 1)
        Y = torch.stack(self.ys).flatten()
        sums = Z.new_zeros(self.C, Z.shape[1]).scatter_add_(0, Y[:, None].expand_as(Z), Z)
        counts = torch.bincount(Y, minlength=self.C).to(Z.dtype).clamp_min(1)
        means = sums / counts[:, None]
        return ((z - means[y]) ** 2).mean()


class PlainNSR:
    """NSR in plain public torch: slot k of `ring` (K x C x (D+1)) holds batch k's per-class sums
    of the detached responses and, in the last column, its per-class sample counts. The class
    means are the ring summed over its K slots, sums over counts; the loss is F.mse_loss against them.
    tests/test_library_inputs.py checks that it computes NeuronSteadiness's loss."""

    def __init__(self, num_classes, K):
        self.C, self.K, self.ring, self.ptr = num_classes, K, None, 0

    def __call__(self, z, y):
        z = z.flatten(1)
        if self.ring is None:
            self.ring = z.new_zeros(self.K, self.C, z.shape[1] + 1)
        stats = torch.cat([z.detach(), z.new_ones(z.shape[0], 1)], dim=1)
        self.ring[self.ptr].zero_().index_add_(0, y, stats)
        self.ptr = (self.ptr + 1) % self.K
        total = self.ring.sum(0)
        means = total[:, :-1] / total[:, -1:].clamp_min(1)
        return F.mse_loss(z, means.index_select(0, y))


def make_variant(kind, name, C, shape, layer, lam, K, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, C, shape)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if kind == "plain":
        extra = None
    elif kind == "nsr":  # `layer` may be a list: NSR on each, with the same lambda
        reg = NeuronSteadiness(model, {name: lam for name in ([layer] if isinstance(layer, str) else layer)}, C,
                               queue_batches=K)
        extra = lambda y: reg(y)  # noqa: E731
    elif kind == "floor":
        box = output_of(model, layer)
        mu = torch.randn(C, dict(model.named_modules())[layer].out_features)  # a Linear layer
        extra = lambda y: lam * F.mse_loss(box["z"].flatten(1), mu.index_select(0, y))  # noqa: E731
    elif kind == "ring":
        box = output_of(model, layer)
        ring = PlainNSR(C, K)
        extra = lambda y: lam * ring(box["z"], y)  # noqa: E731
    elif kind == "original":
        box = output_of(model, layer)
        queue = OriginalQueue(C, K)
        extra = lambda y: lam * queue(box["z"], y)  # noqa: E731
    else:
        raise ValueError(kind)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra(y)
        loss.backward()
        opt.step()

    return step


def ops_per_step(step, x, y):
    """aten ops in one step that no other aten op called (what Python and autograd dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, y)

    def outermost(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and outermost(e))


def bench(title, name, C, shape, batch, layer, lam, K, kinds, rounds, steps, warmup, clock=time.perf_counter):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, *shape, generator=g), torch.randint(0, C, (batch,), generator=g))
            for _ in range(8)]
    variants = {k: make_variant(k, name, C, shape, layer, lam, K) for k in kinds}
    for step in variants.values():
        for i in range(warmup):
            step(*data[i % len(data)])
    ops = {k: ops_per_step(step, *data[0]) for k, step in variants.items()}
    times = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]  # alternate the order: no position bias
        for k in order:
            step = variants[k]
            t0 = clock()
            for i in range(steps):
                step(*data[i % len(data)])
            times[k].append((clock() - t0) / steps)
    print(f"\n{title}: batch {batch}, NSR on {layer!r}, K={K}, {rounds} rounds x {steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'variant':<9} {'median ms':>9} {'p10 ms':>8} {'+us/step':>9} {'ratio':>7} {'p10 ratio':>9} "
          f"{'+ops':>5}")
    base, base10 = statistics.median(times["plain"]), p10(times["plain"])
    ratios = {}
    for k in kinds:
        med = statistics.median(times[k])
        # Ratio per round (each round times every variant back to back), then the median of those.
        ratios[k] = statistics.median(t / b for t, b in zip(times[k], times["plain"]))
        print(f"  {k:<9} {med * 1e3:>9.3f} {p10(times[k]) * 1e3:>8.3f} {(med - base) * 1e6:>9.1f} "
              f"{ratios[k]:>6.3f}x {p10(times[k]) / base10:>8.3f}x {ops[k] - ops['plain']:>5}")
    print("  ratio: median over rounds of variant time / plain time in the same round; "
          "p10 ratio: 10th percentiles' ratio (less sensitive to other processes); "
          "+ops: aten ops the variant adds to one plain step (forward, backward, optimizer)")
    if "ring" in kinds:  # NSR against the plain form, per round as above
        ratios["nsr/ring"] = statistics.median(n / r for n, r in zip(times["nsr"], times["ring"]))
    return ratios, {k: ops[k] - ops["plain"] for k in kinds}


def p10(values):
    return sorted(values)[len(values) // 10]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resnet-steps", type=int, default=3)
    p.add_argument("--resnet-rounds", type=int, default=15)
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (default: leave torch's default, one per core)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time.perf_counter (default) or time.thread_time, this thread's CPU time")
    args = p.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, {args.clock} clock")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"warning: load average {load:.1f} before starting: other processes share the CPUs, "
              "so the timings are noisy")

    r, ops = bench("MLP-4 784-256-100-10", "mlp4", 10, (1, 28, 28), 100, "out", 7.4865, 5,
                   ["plain", "nsr", "ring", "floor", "original"], args.rounds, args.steps, warmup=20, clock=clock)
    verdict = "met" if r["nsr"] <= 1.20 else "NOT met"
    against = r["nsr/ring"]
    print(f"  MLP-4 NSR over the plain form (ring), per round: {against:.3f}x (guard <= 1.05: "
          f"{'met' if against <= 1.05 else 'NOT met'})")
    print(f"  MLP-4 NSR overhead: {r['nsr']:.3f}x, +{ops['nsr']} ops per step (guard <= 1.20: {verdict}); "
          f"original approach {r['original']:.3f}x, +{ops['original']} ops; "
          f"bare loss floor {r['floor']:.3f}x, +{ops['floor']} ops")

    r, ops = bench("MLP-4, NSR on three layers", "mlp4", 10, (1, 28, 28), 100, ["fc1", "fc2", "out"], 1.0, 5,
                   ["plain", "nsr"], args.rounds, args.steps, warmup=20, clock=clock)
    print(f"  MLP-4 NSR on fc1, fc2, out: {r['nsr']:.3f}x, +{ops['nsr']} ops per step (a memory per layer)")

    if not args.skip_resnet:
        try:
            r, ops = bench("ResNet-18 CIFAR 3x32x32", "resnet18", 10, (3, 32, 32), 32, "fc", 1.0, 5,
                           ["plain", "nsr", "floor"], args.resnet_rounds, args.resnet_steps, warmup=2,
                           clock=clock)
            verdict = "met" if r["nsr"] <= 1.02 else "NOT met"
            print(f"  ResNet-18 NSR overhead: {r['nsr']:.3f}x, +{ops['nsr']} ops per step (guard <= 1.02: {verdict})")
        except ImportError as exc:
            print(f"\nResNet-18 skipped: {exc}")


if __name__ == "__main__":
    main()
