"""DaliLoader serves DeviceLoader's batches (same samples, same order, same values up to fp32 rounding) through a
DALI pipeline; CPU-only pipelines here (device_id=None), the same tests on a GPU when one is visible.

Tolerance: fp32 images within two fp32 ulps of the largest |value| of DeviceLoader's (DALI normalizes with one
fused (x - 255 m) / (255 s), torchvision with three roundings); fp16 and bf16 bitwise equal for the statistics
used here; labels, shapes, strides and batch sizes exactly equal.
"""

import math

import pytest
import torch
from helpers import requires_cuda, small_set
from torchvision import datasets, transforms

from fastcnn.data import FASHION_MNIST_NORM, MNIST_NORM, DeviceLoader, ImageDataset, load_dataset, make_loader
from fastcnn.data.dali_loader import DaliLoader
from fastcnn.data.dali_status import dali_gpu_status, dali_status
from fastcnn.data.sampling import epoch_permutation, shard

MEAN, STD = MNIST_NORM
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def for_rgb(norm):
    """One-channel (mean, std) repeated for three channels."""
    return tuple(values * 3 for values in norm)


STATISTICS = [for_rgb(MNIST_NORM), for_rgb(FASHION_MNIST_NORM), IMAGENET_NORM, for_rgb(((0.5,), (0.5,)))]


def fp32_tolerance(reference: torch.Tensor) -> float:
    """Two fp32 ulps at the largest |value| of ``reference``."""
    largest = reference.abs().max().item()
    return 2 * torch.finfo(torch.float32).eps * 2 ** math.floor(math.log2(largest)) if largest else 0.0


def assert_same_batches(dali, device):
    """Same batches; fp32 (and fp64, cast from DALI's fp32) within ``fp32_tolerance``, fp16/bf16 bitwise."""
    count = 0
    for (a, b), (c, d) in zip(dali, device, strict=True):
        assert a.shape == c.shape and a.dtype == c.dtype and a.stride() == c.stride() and a.device == c.device
        assert torch.equal(b, d) and b.dtype == torch.int64
        if a.dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(a, c)
        else:
            assert (a - c).abs().max().item() <= fp32_tolerance(c)
        count += 1
    assert count == len(dali) == len(device)


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels back from images normalized with mean 0, std 1 (x / 255)."""
    return (images.float() * 255).round().to(torch.uint8)


def test_dali_is_available_on_this_machine():
    ok, why = dali_status()
    assert ok, why
    gpu_ok, gpu_why = dali_gpu_status()
    assert gpu_ok == torch.cuda.is_available() or "cannot run on the GPU" in gpu_why


@pytest.mark.parametrize("batch_size", [1, 10, 64, 103, 500])
@pytest.mark.parametrize("drop_last", [False, True])
def test_same_batches_as_device_loader(batch_size, drop_last):
    data = small_set()
    kw = dict(seed=3, drop_last=drop_last, mean=MEAN, std=STD)
    assert_same_batches(DaliLoader(data, batch_size, **kw), DeviceLoader(data, batch_size, **kw))


def test_every_sample_once_with_its_label_and_no_shuffle_keeps_order():
    data = small_set()
    images, labels = (torch.cat(part) for part in zip(*DaliLoader(data, 16, seed=1), strict=True))
    index = {bytes(row.numpy()): i for i, row in enumerate(data.images.flatten(1))}
    served = [index[bytes(row.numpy())] for row in as_pixels(images).flatten(1)]
    assert sorted(served) == list(range(len(data)))
    assert torch.equal(labels, data.labels[served])
    in_order = torch.cat([x for x, _ in DaliLoader(data, 16, shuffle=False)])
    assert torch.equal(as_pixels(in_order), data.images)


@pytest.mark.parametrize("mean, std", STATISTICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalization_of_every_pixel_value(mean, std, dtype):
    """All 256 uint8 values in each of 3 channels: the values are a function of (value, channel) only, so this
    covers every image."""
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(1, 3, 1, 1)
    data = ImageDataset("all", pixels, torch.zeros(1, dtype=torch.int64), ["0"])
    dali, _ = next(iter(DaliLoader(data, 1, mean=mean, std=std, dtype=dtype)))
    reference = transforms.Normalize(mean, std)(pixels.float() / 255).to(dtype)  # ToTensor: x / 255
    if dtype == torch.float32:
        assert (dali - reference).abs().max().item() <= fp32_tolerance(reference)
    else:
        assert torch.equal(dali, reference)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_layout_and_dtype(channels, dtype):
    data = small_set(channels=channels)
    kw = dict(seed=2, dtype=dtype, channels_last=True, mean=(0.5,) * channels, std=(0.25,) * channels)
    loader = DaliLoader(data, 8, **kw)
    images, labels = next(iter(loader))
    assert images.shape == (8, channels, 7, 7) and images.dtype == dtype and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert images.permute(0, 2, 3, 1).is_contiguous()  # DALI's NHWC buffer itself, seen as NCHW
    assert_same_batches(loader, DeviceLoader(data, 8, **kw))
    plain, _ = next(iter(DaliLoader(data, 8, **{**kw, "channels_last": False})))
    assert plain.is_contiguous() and torch.equal(plain, images)


def test_sharding_matches_device_loader_and_is_disjoint():
    data = small_set()
    seen = []
    for rank in range(3):
        kw = dict(seed=4, rank=rank, world_size=3)
        dali = DaliLoader(data, 10, **kw)
        assert len(dali) == len(DeviceLoader(data, 10, **kw)) == 4  # 34 samples per rank
        assert_same_batches(dali, DeviceLoader(data, 10, **kw))
        seen.append(torch.cat([as_pixels(x).flatten(1) for x, _ in dali]))
    rows = {bytes(row.numpy()) for part in seen for row in part}
    assert len(rows) == 102 == 3 * 34
    order = shard(epoch_permutation(103, seed=4, epoch=0), 1, 3)
    assert torch.equal(as_pixels(next(iter(DaliLoader(data, 34, seed=4, rank=1, world_size=3)))[0]),
                       data.images[order])


def test_epochs_differ_and_resume_inside_an_epoch():
    data = small_set()
    loader = DaliLoader(data, 10, seed=5)
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in loader]), torch.cat([y for _, y in whole]))
    loader.set_epoch(2, start_batch=4)
    rest = list(loader)
    assert len(rest) == len(whole) - 4
    for (a, b), (c, d) in zip(whole[4:], rest, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_kept_batches_stay_valid_and_abandoned_epochs_leave_nothing_behind():
    """Measured property of DALI's dynamic executor on CPU: each yielded tensor owns its buffer, so no copy."""
    data = small_set()
    kw = dict(seed=6, mean=MEAN, std=STD)
    loader = DaliLoader(data, 10, **kw)
    kept = next(iter(loader))  # an epoch abandoned after one batch
    snapshot = (kept[0].clone(), kept[1].clone())
    epoch = list(loader)  # every batch of the epoch kept alive at once
    loader.set_epoch(1)
    list(loader)
    assert torch.equal(kept[0], snapshot[0]) and torch.equal(kept[1], snapshot[1])
    assert torch.equal(epoch[0][0], snapshot[0])  # the next epoch started from its own first batch
    assert len({images.data_ptr() for images, _ in epoch}) == len(epoch)  # no buffer shared or reused
    assert_same_batches(epoch, DeviceLoader(data, 10, **kw))


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved so that out[y, x] = image[y + dy, x + dx], zero outside."""
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[:, ys, xs] = image[:, max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out


def augmentations(augmented: torch.Tensor, original: torch.Tensor, max_shift: int = 2) -> set:
    found = set()
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            moved = shifted(original, dy, dx)
            if torch.equal(augmented, moved):
                found.add((dy, dx, False))
            if torch.equal(augmented, moved.flip(-1)):
                found.add((dy, dx, True))
    return found


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("channels", [1, 3])  # grayscale digits and RGB images (CIFAR-10, colour folders)
def test_augmentation_translates_and_flips_only_when_asked(flip, channels):
    data = small_set(size=9, channels=channels)
    kw = dict(seed=7, channels_last=True)
    aug = DaliLoader(data, 16, augment=True, flip=flip, **kw)
    plain = DeviceLoader(data, 16, **kw)
    draws = []
    for (a, b), (c, d) in zip(aug, plain, strict=True):
        assert a.shape == c.shape and a.dtype == c.dtype and a.stride() == c.stride() and torch.equal(b, d)
        for moved, original in zip(as_pixels(a), as_pixels(c), strict=True):
            found = augmentations(moved, original)
            assert len(found) == 1, found  # exactly one shift (and flip) explains the image
            draws.extend(found)
    mirrored = sum(m for _, _, m in draws)
    assert (mirrored == 0) if not flip else (20 < mirrored < 83)
    assert len({(dy, dx) for dy, dx, _ in draws}) > 15  # most of the 25 shifts occur
    assert sum((dy, dx) != (0, 0) for dy, dx, _ in draws) > 80  # pixels change


def test_augmentation_is_reproducible_and_resumable():
    data = small_set()
    loader = DaliLoader(data, 10, seed=8, augment=True, flip=True)
    first = torch.cat([x for x, _ in loader])
    assert torch.equal(first, torch.cat([x for x, _ in DaliLoader(data, 10, seed=8, augment=True, flip=True)]))
    loader.set_epoch(0, start_batch=3)
    assert torch.equal(first[30:], torch.cat([x for x, _ in loader]))
    loader.set_epoch(1)
    assert not torch.equal(first, torch.cat([x for x, _ in loader]))


def test_bad_arguments():
    data = small_set()
    with pytest.raises(ValueError, match="flip=True needs augment=True"):
        DaliLoader(data, 8, flip=True)
    with pytest.raises(ValueError, match="floating-point"):
        DaliLoader(data, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="batch_size"):
        DaliLoader(data, 0)
    with pytest.raises(ValueError, match="rank"):
        DaliLoader(data, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cpu or cuda"):
        DaliLoader(data, 8, device="meta")


def test_make_loader_builds_the_dali_loader():
    loader = make_loader("dali", small_set(), 32, seed=1, mean=MEAN, std=STD)
    assert isinstance(loader, DaliLoader) and len(loader) == 4


def test_real_mnist_matches_device_loader_and_torchvision(data_root):
    test = load_dataset("mnist", False, root=data_root, download=False)
    kw = dict(seed=0, mean=MEAN, std=STD)
    assert_same_batches(DaliLoader(test, 1000, **kw), DeviceLoader(test, 1000, **kw))
    reference = datasets.MNIST(str(data_root), train=False, download=False,
                               transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    images, labels = next(iter(DaliLoader(test, 1000, shuffle=False, **kw)))
    for i in (0, 1, 7, 500, 999):
        expected, label = reference[i]
        assert (images[i] - expected).abs().max().item() <= fp32_tolerance(expected)
        assert labels[i].item() == label
    bf16, _ = next(iter(DaliLoader(test, 1000, shuffle=False, dtype=torch.bfloat16, channels_last=True, **kw)))
    assert torch.equal(bf16, images.to(torch.bfloat16))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_pipeline_matches_device_loader(dtype):
    data = small_set(channels=3)
    # ImageNet's statistics: with a mean that is a whole multiple of 1/255 (0.4 = 102/255), DALI's GPU formula
    # fmaf(x, 1/S, -M/S) leaves ~5e-8 where torch has 0, a nonzero float16 subnormal (see dali_loader's docstring).
    kw = dict(seed=9, device="cuda", dtype=dtype, channels_last=True, mean=IMAGENET_NORM[0], std=IMAGENET_NORM[1])
    assert_same_batches(DaliLoader(data, 10, **kw), DeviceLoader(data, 10, **kw))
    # Unshuffled: CPU and CUDA generators draw different permutations for one seed; the augmentation's draws are
    # per position, so in the same order both pipelines must shift and flip the same images alike.
    aug = DaliLoader(data, 10, augment=True, flip=True, **{**kw, "device": "cpu", "shuffle": False})
    gpu_aug = DaliLoader(data, 10, augment=True, flip=True, **{**kw, "shuffle": False})
    for (a, _), (c, _) in zip(aug, gpu_aug, strict=True):
        assert torch.allclose(a.float(), c.cpu().float(), atol=2e-2)  # one bf16 ulp at 2.8
