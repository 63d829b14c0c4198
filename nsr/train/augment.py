"""Batched CIFAR-style augmentation as tensor ops, on whatever device the batch lives.

All randomness comes from an explicit `torch.Generator`, so a run is reproducible and, by saving
`generator.get_state()`, resumable. Random numbers are drawn on the generator's device and then
moved to the batch's device: a generator on x.device (e.g. torch.Generator(device="cuda") for a
CUDA batch) avoids any copy; a CPU generator with a CUDA batch also works (a small H2D copy).
`generator=None` uses the default generator of x's device. No op loops over samples in Python.

    gen = torch.Generator(device=x.device).manual_seed(seed)
    x = augment_batch(x_uint8, gen, crop_padding=4, flip=True, cutout_size=16,
                      mean=CIFAR10_MEAN, std=CIFAR10_STD, dtype=torch.float32)

Order of the pipeline (and of the random draws): crop and flip on the uint8 images, normalise,
then cutout on the normalised float images (so cut pixels are 0 = the dataset mean).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "random_crop", "random_flip",
           "cutout", "normalize", "augment_batch"]

# Per-channel statistics on the [0, 1] scale, as normalize() takes them; the project's only copy.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a batch N x C x H x W, got {shape}")


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, high), drawn on the generator's device, returned on `device`."""
    draw_device = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=draw_device).to(device, non_blocking=True)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device, non_blocking=True)


def random_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
                return_offsets: bool = False):
    """Zero-pad by `padding` on each side, then crop back to H x W at a random offset per sample.

    Same distribution as torchvision RandomCrop((H, W), padding=padding): offsets (dy, dx) are
    uniform in [0, 2*padding], and output[n, :, i, j] = padded[n, :, dy + i, dx + j].
    Done by one gather over clamped indices plus a zero mask; the padded batch is never built.
    The result is channels_last in memory (values and shape as usual; normalize() sets the
    final memory format).
    return_offsets: also return the N x 2 tensor of (dy, dx) used.
    """
    _check_batch(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = x.shape
    if padding == 0:
        return (x, x.new_zeros(n, 2, dtype=torch.long)) if return_offsets else x
    offsets = _randint(2 * padding + 1, (n, 2), generator, x.device)
    rows = offsets[:, :1] - padding + torch.arange(h, device=x.device)  # N x H, source row
    cols = offsets[:, 1:] - padding + torch.arange(w, device=x.device)  # N x W, source column
    inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)  # N x H x W
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # Advanced indices split by the channel slice go first: the result is N x H x W x C.
    picked = x[batch, :, rows.clamp(0, h - 1).unsqueeze(2), cols.clamp(0, w - 1).unsqueeze(1)]
    picked = torch.where(inside.unsqueeze(3), picked, picked.new_zeros(()))
    out = picked.permute(0, 3, 1, 2)
    return (out, offsets) if return_offsets else out


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                return_mask: bool = False):
    """Flip each sample horizontally (last axis) with probability p.

    return_mask: also return the N-element boolean tensor of which samples were flipped.
    """
    _check_batch(x)
    flipped = _rand((x.shape[0],), generator, x.device) < p
    out = torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x)
    return (out, flipped) if return_mask else out


def cutout(x: torch.Tensor, size: int = 16, generator: torch.Generator | None = None,
           return_centers: bool = False):
    """Cutout (DeVries & Taylor, 2017): zero a size x size square per sample.

    The centre (cy, cx) is a uniform random pixel; the square covers rows
    [cy - size//2, cy - size//2 + size) and likewise columns, clipped at the borders, so it may
    be smaller than size x size near an edge. Apply after normalisation (0 = the mean).
    return_centers: also return the N x 2 tensor of (cy, cx) used. size 0 is a no-op.
    """
    _check_batch(x)
    if size < 0:
        raise ValueError(f"cutout size must be >= 0, got {size}")
    n, _, h, w = x.shape
    if size == 0:
        return (x, x.new_zeros(n, 2, dtype=torch.long)) if return_centers else x
    cy = _randint(h, (n,), generator, x.device)
    cx = _randint(w, (n,), generator, x.device)
    centers = torch.stack([cy, cx], dim=1)
    start = centers - size // 2  # N x 2; the end is start + size, both compared, not clipped
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_rows = (r >= start[:, :1]) & (r < start[:, :1] + size)  # N x H
    in_cols = (c >= start[:, 1:]) & (c < start[:, 1:] + size)  # N x W
    square = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)  # N x 1 x H x W
    out = x.clone()  # keeps x's memory format (masked_fill would follow the mask's)
    out.masked_fill_(square, 0)
    return (out, centers) if return_centers else out


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
              dtype: torch.dtype = torch.float32,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, as `dtype`; mean and std are on the [0, 1] scale.

    uint8 input is scaled by 1/255; floating input is taken to be on [0, 1] already.
    Arithmetic is in float32 (then cast). memory_format: of the result, e.g. torch.channels_last
    for a channels_last model, or torch.preserve_format to keep the input's.
    Pass mean/std as tensors on x.device to avoid a small copy per call.
    """
    _check_batch(x)
    if not dtype.is_floating_point:
        raise ValueError(f"normalize needs a floating dtype, got {dtype}")
    c = x.shape[1]
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1)
    if mean.numel() not in (1, c) or std.numel() not in (1, c):
        raise ValueError(f"mean and std need 1 or {c} values, got {mean.numel()} and {std.numel()}")
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    mult = (scale / std).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    x = x.to(dtype=torch.float32, memory_format=memory_format)
    return (x * mult - shift).to(dtype)


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, crop_padding: int = 4,
                  flip: bool = True, cutout_size: int = 0,
                  mean: Sequence[float] | torch.Tensor = CIFAR10_MEAN,
                  std: Sequence[float] | torch.Tensor = CIFAR10_STD,
                  dtype: torch.dtype = torch.float32,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Crop (crop_padding > 0) and flip (flip=True) the uint8 batch, normalise to `dtype`, then
    cutout (cutout_size > 0). Returns N x C x H x W float in `memory_format`
    (torch.channels_last for a channels_last model)."""
    if crop_padding:
        x = random_crop(x, crop_padding, generator)
    if flip:
        x = random_flip(x, generator)
    x = normalize(x, mean, std, dtype, memory_format)
    if cutout_size:
        x = cutout(x, cutout_size, generator)
    return x
