"""Neuron intra-class response variance: the measurement of `python -m nsr analyze` and of the
steadiness figure each validation pass logs (nsr/train/evaluation.py). One implementation for both,
so the live curve and the analysis of a checkpoint agree to float64 rounding.

A layer's output is flattened to B x D neurons (N x C x H x W outputs: one neuron per channel, its
spatial mean as the response). Over all N samples, per neuron j:

    intra_j = sum_c (n_c / N) * Var_c(z_j)      Var_c: population variance over class c's samples
    total_j = Var(z_j)                          over all N samples

and a layer's figure is the mean of intra_j over its neurons.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def responses(output: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """B x D neuron responses (a copy, float64 unless `dtype` says otherwise): 4-D (and 3-D/5-D)
    outputs become per-channel spatial means."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    out = output.detach()
    if out.dim() > 2:
        out = out.flatten(2).mean(dim=2)
    elif out.dim() == 1:
        out = out[:, None]
    return out.to(dtype, copy=True)  # a copy: a later in-place op (ReLU(inplace=True)) cannot change it


class ClassMoments:
    """Per-class count, mean and sum of squared deviations (M2) of B x D responses, merged
    batch by batch with Chan et al.'s parallel update in float64. A batch's own mean and M2 are
    computed in the responses' dtype: float64 for `python -m nsr analyze`; float32 for the figure of
    each validation pass, which then costs half as much and agrees with float64 to about 1e-6."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.count = self.mean = self.m2 = None

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        C = self.num_classes
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        y = y.to(device=z.device, dtype=torch.long)
        n_b = torch.bincount(y, minlength=C).to(torch.float64)
        sums = torch.zeros(C, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, y, z)
        mean_b = sums / n_b.to(z.dtype).clamp_min(1)[:, None]
        dev = z - mean_b.index_select(0, y)
        m2_b = torch.zeros_like(sums).index_add_(0, y, dev.square_())
        self._merge(n_b, mean_b.double(), m2_b.double())

    def _merge(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self.count is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if self.mean.shape[1] != mean_b.shape[1]:
            raise ValueError(f"layer output changed from {self.mean.shape[1]} to {mean_b.shape[1]} neurons")
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        safe = n.clamp_min(1)[:, None]
        self.mean = self.mean + delta * (n_b[:, None] / safe)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b)[:, None] / safe
        self.count = n

    def all_reduce(self) -> None:
        """Merge every rank's moments (each rank saw its own shard): afterwards every rank holds
        those of all samples. Two all-reduces: the counts and sums give the global class means,
        then each rank's M2 is moved to them (M2 + n_r (mean_r - mean)^2) and summed."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        count_sums = torch.cat((self.count[:, None], self.count[:, None] * self.mean), dim=1)
        dist.all_reduce(count_sums)
        count = count_sums[:, 0]
        mean = count_sums[:, 1:] / count.clamp_min(1)[:, None]
        m2 = self.m2 + self.count[:, None] * (self.mean - mean) ** 2
        dist.all_reduce(m2)
        self.count, self.mean, self.m2 = count, mean, m2

    def intra(self) -> torch.Tensor:
        """Per-neuron intra-class variance sum_c (n_c / N) Var_c (float64, length D)."""
        if self.count is None:
            raise ValueError("no samples were seen")
        return self.m2.sum(dim=0) / self.count.sum()

    def result(self) -> dict:
        """Per-neuron intra-class and total variance (numpy float64 arrays of length D)."""
        intra = self.intra()
        N = float(self.count.sum())
        grand = (self.count[:, None] * self.mean).sum(dim=0) / N
        between = (self.count[:, None] * (self.mean - grand) ** 2).sum(dim=0) / N
        return {"intra": intra.cpu().numpy(), "total": (intra + between).cpu().numpy(),
                "num_samples": int(N), "class_counts": self.count.cpu().numpy().astype(int).tolist()}
