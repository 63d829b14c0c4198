"""Batched tensor augmentation: exact agreement with naive per-sample references, and seeding."""

import math

import pytest
import torch
import torch.nn.functional as F

from nsr.train.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    augment_batch,
    cutout,
    normalize,
    random_crop,
    random_flip,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=64, c=3, h=32, w=32, seed=1):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen(seed))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_shapes_and_dtypes_preserved(dtype):
    x = images(8, h=32, w=24).to(dtype)
    for out in (random_crop(x, 4, gen()), random_flip(x, gen()), cutout(x, 8, gen())):
        assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_matches_naive_pad_and_slice(padding):
    x = images(300, h=32, w=28)
    out, offsets = random_crop(x, padding, gen(3), return_offsets=True)
    assert offsets.shape == (300, 2)
    assert int(offsets.min()) == 0 and int(offsets.max()) == 2 * padding  # full range, in bounds
    padded = F.pad(x, (padding,) * 4)  # zeros
    for n, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[n], padded[n, :, dy:dy + 32, dx:dx + 28]), n


def test_crop_padding_zero_is_identity():
    x = images(5)
    assert torch.equal(random_crop(x, 0, gen()), x)


def test_crop_offsets_uniform():
    _, offsets = random_crop(images(4000, c=1, h=4, w=4), 4, gen(5), return_offsets=True)
    counts = torch.bincount(offsets.flatten(), minlength=9).double()
    expected = offsets.numel() / 9
    # Each bin ~ Binomial(8000, 1/9): within 6 standard deviations.
    assert ((counts - expected).abs() < 6 * math.sqrt(expected * 8 / 9)).all()


def test_flip_half_of_samples_and_matches_torch_flip():
    n = 2000
    x = images(n, h=4, w=6)
    out, flipped = random_flip(x, gen(7), return_mask=True)
    k = int(flipped.sum())
    assert abs(k - n / 2) < 6 * math.sqrt(n / 4)  # Binomial(n, 1/2), 6 sigma
    assert torch.equal(out[flipped], torch.flip(x[flipped], dims=[3]))
    assert torch.equal(out[~flipped], x[~flipped])


def _naive_cutout_mask(h, w, cy, cx, size):
    mask = torch.zeros(h, w, dtype=torch.bool)
    y0, x0 = cy - size // 2, cx - size // 2
    mask[max(y0, 0):min(y0 + size, h), max(x0, 0):min(x0 + size, w)] = True
    return mask


@pytest.mark.parametrize("size", [16, 5])
def test_cutout_zeros_exactly_the_clipped_square(size):
    x = normalize(images(400), CIFAR10_MEAN, CIFAR10_STD).abs() + 0.1  # no zeros to begin with
    out, centers = cutout(x, size, gen(11), return_centers=True)
    assert ((centers >= 0) & (centers < 32)).all()
    areas = []
    for n, (cy, cx) in enumerate(centers.tolist()):
        mask = _naive_cutout_mask(32, 32, cy, cx, size)
        zero = (out[n] == 0)
        assert torch.equal(zero, mask.expand_as(zero)), n  # same square in every channel
        assert torch.equal(out[n][~zero], x[n][~zero])
        areas.append(int(mask.sum()))
    assert max(areas) == size * size  # an interior square is complete
    assert min(areas) < size * size  # some are clipped at the borders


def test_cutout_square_larger_than_image_is_clipped_to_it():
    # A 16 x 16 square centred anywhere in a 6 x 6 image covers all of it (and nothing outside).
    x = torch.ones(50, 2, 6, 6)
    assert torch.equal(cutout(x, 16, gen(0)), torch.zeros_like(x))
    # size 1 zeros exactly the centre pixel.
    out, centers = cutout(x, 1, gen(0), return_centers=True)
    assert torch.equal((out == 0).flatten(2).sum(2), torch.ones(50, 2, dtype=torch.long))
    assert (out[torch.arange(50), :, centers[:, 0], centers[:, 1]] == 0).all()


def test_normalize_values_dtype_and_format():
    x = images(4)
    ref = (x.float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    out = normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    bf = normalize(x, CIFAR10_MEAN, CIFAR10_STD, dtype=torch.bfloat16, memory_format=torch.channels_last)
    assert bf.dtype == torch.bfloat16 and bf.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bf.float(), ref, atol=2e-2, rtol=1e-2)
    # Float input on [0, 1] is not rescaled; channels_last input works too.
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalize(cl.float() / 255, torch.tensor(CIFAR10_MEAN), CIFAR10_STD), ref)


def test_augment_batch_composition_and_seeding():
    x = images(32)
    kw = dict(crop_padding=4, flip=True, cutout_size=16, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    a = augment_batch(x, gen(0), **kw)
    assert a.shape == x.shape and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, augment_batch(x, gen(0), **kw))
    assert not torch.equal(a, augment_batch(x, gen(1), **kw))
    # Same as calling the steps by hand in the documented order with one generator.
    g = gen(0)
    b = cutout(normalize(random_flip(random_crop(x, 4, g), g), CIFAR10_MEAN, CIFAR10_STD), 16, g)
    assert torch.equal(a, b)
    # Resumable: saving the generator state replays the next batch exactly.
    g = gen(2)
    augment_batch(x, g, **kw)
    state = g.get_state()
    nxt = augment_batch(x, g, **kw)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(nxt, augment_batch(x, g2, **kw))
    # bf16, channels_last, no augmentation at all = plain normalisation.
    c = augment_batch(x, gen(0), **kw, dtype=torch.bfloat16, memory_format=torch.channels_last)
    assert c.dtype == torch.bfloat16 and c.is_contiguous(memory_format=torch.channels_last)
    plain = augment_batch(x, gen(0), crop_padding=0, flip=False, cutout_size=0)
    assert torch.equal(plain, normalize(x, CIFAR10_MEAN, CIFAR10_STD))


def test_default_generator_and_bad_input():
    x = images(4)
    assert augment_batch(x, None, cutout_size=8).shape == x.shape
    with pytest.raises(ValueError):
        random_crop(x[0], 4, gen())
    with pytest.raises(ValueError):
        random_crop(x, -1, gen())
    with pytest.raises(ValueError):
        normalize(x, (0.5, 0.5), (0.2, 0.2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_device_and_cpu_generators():
    x = images(16).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment_batch(x, g, cutout_size=16)
    assert out.is_cuda and out.shape == x.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    assert torch.equal(out, augment_batch(x, g, cutout_size=16))
    # A CPU generator gives the same draws as on CPU.
    cpu = augment_batch(x.cpu(), gen(4), cutout_size=16)
    torch.testing.assert_close(augment_batch(x, gen(4), cutout_size=16).cpu(), cpu)
