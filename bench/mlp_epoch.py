"""One MLP-4 epoch on Fashion-MNIST: our in-memory pipeline against the classic DataLoader one.

    python bench/mlp_epoch.py [--data-dir /usr/share/datasets/fashion-mnist] [--rounds 3]

Both train MLP-4 + NSR (output layer, K=5, lambda 7.4865) with SGD lr 0.01, batch 100 on the
same 50,000 training images and then score the 10,000 validation images:
- ours: the training engine (nsr.train.engine.Trainer): tensors converted once, index-slice batches;
- classic: torchvision's FashionMNIST Dataset + DataLoader(ToTensor()), as the original code did,
  with the same model, optimizer and regularizer.
Rounds alternate (ours, classic, ours, ...) and the medians are compared, since the machine's
speed drifts. Needs the four idx files (`apt-get install dataset-fashion-mnist` on Debian).
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


def ours_epoch(data_dir: str, epoch: int, threads: int) -> float:
    cfg = parse_args(["--config", "configs/mlp4.yaml", "--dataset", "fashion-mnist", "--data-dir", data_dir,
                      "--quiet", "--out", tempfile.mkdtemp(), "--threads", str(threads)])
    trainer = Trainer(cfg, Runtime(torch.device("cpu")))  # data loading (once per run) not timed
    trainer.pos.epoch = epoch
    start = time.perf_counter()
    trainer.train_epoch(None)
    evaluate(trainer, trainer.data.val)
    return time.perf_counter() - start


def classic_root(data_dir: str) -> str:
    """torchvision's layout (FashionMNIST/raw/, uncompressed) built from the idx files."""
    root = tempfile.mkdtemp()
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw)
    for stem in IDX_FILES.values():
        src = os.path.join(data_dir, stem + ".gz")
        if os.path.exists(src):
            with gzip.open(src) as f, open(os.path.join(raw, stem), "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            shutil.copy(os.path.join(data_dir, stem), raw)
    return root


def classic_epoch(root: str, epoch: int, threads: int) -> float:
    import torchvision
    import torchvision.transforms as T

    torch.set_num_threads(threads or 1)  # the same threading as ours (the engine's MLP default: 1)
    full = torchvision.datasets.FashionMNIST(root, train=True, transform=T.ToTensor())
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the engine's default, 1 for MLPs)")
    args = parser.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = classic_root(args.data_dir)
    ours, classic = [], []
    for r in range(args.rounds):
        ours.append(ours_epoch(args.data_dir, r, args.threads))
        classic.append(classic_epoch(root, r, args.threads))
        print(f"round {r + 1}: ours {ours[-1]:.2f}s  classic {classic[-1]:.2f}s", flush=True)
    mo, mc = statistics.median(ours), statistics.median(classic)
    print(f"\nMLP-4 + NSR epoch (50k train + 10k val, batch 100, {torch.get_num_threads()} thread), "
          f"median of {args.rounds}:")
    print(f"  ours    {mo:.2f} s")
    print(f"  classic {mc:.2f} s")
    print(f"  ours / classic = {mo / mc:.3f}  (classic is {mc / mo:.1f}x slower)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
