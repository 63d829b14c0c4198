"""ResNet-18 on CIFAR-10-shaped data on one GPU: training throughput of the engine.

    python bench/gpu_cifar.py [--out DIR] [--quick]

Measures, in one run, full training epochs (50,000 images, batch 128, SGD + Nesterov, bf16
autocast, channels_last, crop + flip + Cutout) through the training engine for:
  on-device pipeline (uint8 data on the GPU, batched tensor augmentation)  vanilla | NSR
  DataLoader pipeline (PIL transforms in worker processes, pinned memory)  vanilla | NSR
plus a check that the NSR step makes no host synchronisation (torch.cuda sync debug mode).
Random uint8 images stand in for CIFAR-10 (no download on the GPU machine); the work per image
is the same. Writes gpu_cifar.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsr.train.augment import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from nsr.train.batches import LoaderBatches  # noqa: E402
from nsr.train.config import parse_args  # noqa: E402
from nsr.train.engine import Runtime, Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PilCifar(torch.utils.data.Dataset):
    """The classic pipeline: one PIL image per sample through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, cutout: int = 16):
        import torchvision.transforms as T

        self.images, self.labels, self.cutout = images, labels, cutout
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        x = self.transform(Image.fromarray(self.images[i]))
        cy, cx = np.random.randint(32, size=2)
        h = self.cutout // 2
        x[:, max(cy - h, 0):cy + h, max(cx - h, 0):cx + h] = 0
        return x, int(self.labels[i])


def make_trainer(nsr: bool, n_train: int, batch: int, workers: int, pipeline: str,
                 device: str) -> Trainer:
    args = ["--config", os.path.join(ROOT, "configs", "resnet18_cifar10.yaml"), "--dataset", "fake",
            "--fake-size", str(n_train + 10_000), "--val-size", "10000", "--batch-size", str(batch),
            "--eval-batch-size", "1000", "--quiet", "--out", tempfile.mkdtemp(),
            "--regularizer", "nsr" if nsr else "none", "--device", device, "--workers", str(workers)]
    trainer = Trainer(parse_args(args), Runtime(torch.device(device)))
    if pipeline == "dataloader":
        train = trainer.data.train
        images = train.x.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # N x 32 x 32 x 3 uint8
        dataset = PilCifar(images, train.y.cpu().numpy())
        trainer.data.train = LoaderBatches(dataset, batch, True, 0, workers, torch.device(device))
    return trainer


def timed_epoch(trainer: Trainer, epoch: int) -> float:
    trainer.pos.epoch, trainer.pos.step = epoch, 0
    trainer.meter.reset()
    sync = torch.cuda.synchronize if trainer.rt.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    trainer.train_epoch(None)
    sync()
    return time.perf_counter() - start


def check_no_sync_in_nsr_step() -> str:
    from models import build_model
    from nsr import NeuronSteadiness

    model = build_model("resnet18", 10, (3, 32, 32)).cuda()
    reg = NeuronSteadiness(model, {"fc": 0.5, "layer4": 0.1}, num_classes=10, queue_batches=5,
                           per_channel=True)
    x = torch.randn(128, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")

    def nsr_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
            term = reg(y)
        term.backward()
        return term

    nsr_step()  # the first call checks the label values once (a sync, by design)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            term = nsr_step()
        dtype = term.dtype
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return f"no host sync in 5 NSR steps (sync debug mode 'error'); term dtype {dtype}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda", help="cpu only to check the script itself")
    parser.add_argument("--pipelines", nargs="+", default=["on-device", "dataloader"],
                        choices=["on-device", "dataloader"])
    args = parser.parse_args()
    n_train, batch = (1_280, 128) if args.quick else (50_000, 128)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU is visible; run this on a GPU machine "
                 "(or check the script itself with --device cpu --quick)")
    results = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "images": n_train, "batch": batch, "workers": args.workers, "runs": []}
    print(f"{results['gpu']}, torch {torch.__version__}, {n_train} images/epoch, batch {batch}", flush=True)
    if cuda:
        results["sync_check"] = check_no_sync_in_nsr_step()
        print(results["sync_check"], flush=True)
    for pipeline in args.pipelines:
        for nsr in (False, True):
            trainer = make_trainer(nsr, n_train, batch, args.workers, pipeline, args.device)
            warm = timed_epoch(trainer, 0)  # cudnn autotuning, allocator warm-up, worker start
            times = [timed_epoch(trainer, e) for e in (1, 2)] if pipeline == "on-device" else \
                [timed_epoch(trainer, 1)]
            best = min(times)
            row = {"pipeline": pipeline, "nsr": nsr, "warmup_epoch_s": warm, "epoch_s": times,
                   "images_per_s": n_train / best,
                   "train_acc": trainer.meter.summary()["train_acc"]}
            results["runs"].append(row)
            print(f"{pipeline:10} {'NSR' if nsr else 'vanilla':8} epoch {best:6.2f}s  "
                  f"{row['images_per_s']:8.0f} img/s  (warm-up epoch {warm:.2f}s)", flush=True)
            del trainer
            if cuda:
                torch.cuda.empty_cache()
    by = {(r["pipeline"], r["nsr"]): min(r["epoch_s"]) for r in results["runs"]}
    for pipeline in args.pipelines:
        ratio = by[(pipeline, True)] / by[(pipeline, False)]
        results[f"nsr_over_vanilla_{pipeline}"] = ratio
        print(f"NSR / vanilla ({pipeline}): {ratio:.3f}")
    if len(args.pipelines) == 2:
        results["dataloader_over_on_device_nsr"] = by[("dataloader", True)] / by[("on-device", True)]
        print(f"DataLoader / on-device (NSR): {results['dataloader_over_on_device_nsr']:.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_cifar.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
