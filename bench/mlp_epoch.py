"""One MLP-4 epoch: our engine against the bare loop on the same tensors, and against the classic
DataLoader pipeline.

    python bench/mlp_epoch.py [--data-dir /usr/share/datasets/fashion-mnist] [--dataset mnist] [--rounds 3]

Each variant trains MLP-4 + NSR (output layer, K=5, lambda 7.4865) with SGD lr 0.01, batch 100 on
the same 50,000 training images and then scores the 10,000 validation images:
- ours: the training engine (nsr.train.engine.Trainer) as a run uses it: tensors converted once,
  index-slice batches, TensorBoard events (per-step scalars every 50 steps, the epoch's row) and,
  in the validation pass, the steadiness figure of out, fc1 and fc2;
- ours-quiet: the same engine with no event file and no steadiness figure;
- bare: the floor, a bare loop over the engine's own tensors (randperm, slice, forward, loss + NSR,
  step; a validation forward counting hits);
- classic: torchvision's Dataset + DataLoader(ToTensor()), as the original code did, with the same
  model, optimizer and regularizer.
Rounds alternate the variants and the medians are compared, since the machine's speed drifts.
Guard: ours <= 1.20x bare. Needs the four idx files (`apt-get install dataset-fashion-mnist` on
Debian; any MNIST-format folder with --dataset mnist).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model  # noqa: E402
from nsr import NeuronSteadiness  # noqa: E402
from nsr.train.config import parse_args  # noqa: E402
from nsr.train.datasets import IDX_FILES  # noqa: E402
from nsr.train.engine import Runtime, Trainer, evaluate  # noqa: E402
from nsr.train.tblog import TensorBoardLog  # noqa: E402


def make_trainer(dataset: str, data_dir: str, threads: int) -> Trainer:
    cfg = parse_args(["--config", "configs/mlp4.yaml", "--dataset", dataset, "--data-dir", data_dir,
                      "--quiet", "--out", tempfile.mkdtemp(), "--threads", str(threads)])
    return Trainer(cfg, Runtime(torch.device("cpu")))  # data loading (once per run) not timed


def ours_epoch(trainer: Trainer, epoch: int, logging: bool) -> float:
    """One epoch and its validation as the engine runs them (end_epoch's bookkeeping aside)."""
    trainer.tb = (TensorBoardLog.open(os.path.join(trainer.cfg.out, "tb"), trainer.pos.global_step) if logging
                  else TensorBoardLog())
    trainer.pos.epoch, trainer.pos.step = epoch, 0
    start = time.perf_counter()
    trainer.train_epoch(None)
    val, _, steadiness = evaluate(trainer, trainer.data.val, trainer.probe if logging else None)
    row = {"epoch": epoch + 1, **trainer.meter.summary(), "val_acc": val, "lr": 0.01, "epoch_time_s": 0.0,
           **steadiness}
    trainer.tb.epoch(trainer.pos.global_step, row, None, True)
    trainer.tb.close()
    elapsed = time.perf_counter() - start
    trainer.meter.reset()
    return elapsed


def bare_epoch(trainer: Trainer, epoch: int) -> float:
    """The floor: the engine's own tensors, and nothing but the steps and a validation forward."""
    train, val = trainer.data.train, trainer.data.val
    model = build_model("mlp4", 10, tuple(train.x.shape[1:]))
    reg = NeuronSteadiness(model, {"out": 7.4865}, num_classes=10, queue_batches=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(epoch)
    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(train.y))
    for i in range(len(train)):
        idx = order[i * 100:(i + 1) * 100]
        x, y = train.x[idx], train.y[idx]
        loss = F.cross_entropy(model(x), y) + reg(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(val.x[i:i + 1000]).argmax(1) == val.y[i:i + 1000]).sum())
                      for i in range(0, len(val.y), 1000))
    assert correct >= 0
    return time.perf_counter() - start


TORCHVISION = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def classic_root(data_dir: str, dataset: str) -> str:
    """torchvision's layout (FashionMNIST/raw/ or MNIST/raw/, uncompressed) built from the idx files."""
    root = tempfile.mkdtemp()
    raw = os.path.join(root, TORCHVISION[dataset], "raw")
    os.makedirs(raw)
    for stem in IDX_FILES.values():
        src = os.path.join(data_dir, stem + ".gz")
        if os.path.exists(src):
            with gzip.open(src) as f, open(os.path.join(raw, stem), "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            shutil.copy(os.path.join(data_dir, stem), raw)
    return root


def classic_epoch(root: str, dataset: str, threads: int) -> float:
    import torchvision
    import torchvision.transforms as T

    torch.set_num_threads(threads or 1)  # the same threading as ours (the engine's MLP default: 1)
    full = getattr(torchvision.datasets, TORCHVISION[dataset])(root, train=True, transform=T.ToTensor())
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    train = torch.utils.data.Subset(full, order[10_000:].tolist())
    val = torch.utils.data.Subset(full, order[:10_000].tolist())
    loader = torch.utils.data.DataLoader(train, batch_size=100, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=1000)
    model = build_model("mlp4", 10, (1, 28, 28))
    reg = NeuronSteadiness(model, {"out": 7.4865}, num_classes=10, queue_batches=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    start = time.perf_counter()
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + reg(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val_loader)
    assert correct >= 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--dataset", default="fashion-mnist", choices=sorted(TORCHVISION))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the engine's default, 1 for MLPs)")
    parser.add_argument("--no-classic", action="store_true", help="leave out the DataLoader pipeline")
    args = parser.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = None if args.no_classic else classic_root(args.data_dir, args.dataset)
    trainer = make_trainer(args.dataset, args.data_dir, args.threads)
    runs = {"ours": lambda r: ours_epoch(trainer, r, logging=True), "bare": lambda r: bare_epoch(trainer, r),
            "ours-quiet": lambda r: ours_epoch(trainer, r, logging=False)}
    if root is not None:
        runs["classic"] = lambda r: classic_epoch(root, args.dataset, args.threads)
    for name in ("ours", "bare"):  # warm-up, not timed: first-call allocations and lazy imports
        runs[name](0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each variant leads a round in turn
            times[name].append(runs[name](r + 1))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"\nMLP-4 + NSR epoch on {args.dataset} (50k train + 10k val, batch 100, {torch.get_num_threads()} "
          f"thread), median of {args.rounds}:")
    for k, v in med.items():
        print(f"  {k:10} {v:.2f} s")
    ratio = med["ours"] / med["bare"]
    print(f"  ours / bare       = {ratio:.3f}  (guard <= 1.20: {'met' if ratio <= 1.20 else 'NOT met'})")
    print(f"  ours / ours-quiet = {med['ours'] / med['ours-quiet']:.3f}  (TensorBoard events + steadiness figure)")
    # The figure's own cost, paired: validation passes with and without it, alternating (the
    # epochs above differ by more than it costs when the machine is busy).
    plain, probed = [], []
    for _ in range(10):
        for probe, into in ((None, plain), (trainer.probe, probed)):
            start = time.perf_counter()
            evaluate(trainer, trainer.data.val, probe)
            into.append(time.perf_counter() - start)
    extra = statistics.median(b - a for a, b in zip(plain, probed))
    print(f"  steadiness figure: +{1000 * extra:.1f} ms per validation pass (median of 10 pairs), "
          f"{100 * extra / med['ours-quiet']:.1f} % of an epoch")
    if "classic" in med:
        print(f"  ours / classic    = {med['ours'] / med['classic']:.3f}  "
              f"(classic is {med['classic'] / med['ours']:.1f}x slower)")
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(trainer.cfg.out, ignore_errors=True)


if __name__ == "__main__":
    main()
