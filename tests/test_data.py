"""Datasets and loaders: every sample once per epoch, with its label, with the reference loader's values."""

import subprocess
import sys

import pytest
import torch
from helpers import small_set
from torchvision import datasets, transforms

from fastcnn.data import MNIST_NORM, MNIST_SPLIT_SIZES, DeviceLoader, TorchLoader, load_dataset, synthetic_dataset
from fastcnn.data.image_shape import convert_images, describe_shape, parse_image_size
from fastcnn.data.normalization import as_channel_tensor, channel_stats, normalize_uint8
from fastcnn.data.sampling import batches_per_epoch, epoch_permutation, shard, shard_size

MEAN, STD = MNIST_NORM


def collect(loader):
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("batch_size", [1, 10, 64, 103, 500])
@pytest.mark.parametrize("drop_last", [False, True])
def test_device_loader_serves_every_sample_once_with_its_label(batch_size, drop_last):
    data = small_set()
    loader = DeviceLoader(data, batch_size, seed=3, drop_last=drop_last)
    sizes = [labels.shape[0] for _, labels in loader]
    assert len(sizes) == len(loader)
    assert all(size == batch_size for size in sizes[:-1])
    expected = (len(data) // batch_size) * batch_size if drop_last else len(data)
    assert sum(sizes) == expected
    images, labels = collect(loader) if sizes else (torch.empty(0), torch.empty(0))
    if drop_last:
        return
    raw = (images * 255).round().to(torch.uint8)  # mean 0, std 1: pixels / 255 exactly
    # match each served image back to its sample: all distinct, all present, labels travel with images
    flat = data.images.flatten(1)
    index = {bytes(row.numpy()): i for i, row in enumerate(flat)}
    served = [index[bytes(row.numpy())] for row in raw.flatten(1)]
    assert sorted(served) == list(range(len(data)))
    assert torch.equal(labels, data.labels[served])


def test_epochs_have_different_orders_and_are_reproducible():
    data = small_set()
    loader = DeviceLoader(data, 16, seed=1)
    first = collect(loader)[1]
    loader.set_epoch(1)
    second = collect(loader)[1]
    loader.set_epoch(0)
    again = collect(loader)[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_resuming_inside_an_epoch_serves_the_rest_of_the_same_order():
    data = small_set()
    loader = DeviceLoader(data, 10, seed=5)
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, start_batch=4)
    rest = list(loader)
    assert len(rest) == len(whole) - 4
    for (a, b), (c, d) in zip(whole[4:], rest, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_sharding_is_disjoint_equal_and_nearly_complete():
    order = epoch_permutation(103, seed=0, epoch=0)
    shards = [shard(order, rank, 4) for rank in range(4)]
    assert {s.numel() for s in shards} == {25} == {shard_size(103, 4)}
    union = torch.cat(shards)
    assert union.unique().numel() == 100
    assert torch.equal(shard(order, 0, 1), order) and shard_size(103, 1) == 103


def test_batches_per_epoch_counts_the_smaller_last_batch_unless_dropped():
    assert batches_per_epoch(103, 10, drop_last=False) == 11
    assert batches_per_epoch(103, 10, drop_last=True) == 10
    assert batches_per_epoch(100, 10, drop_last=False) == batches_per_epoch(100, 10, drop_last=True) == 10


def test_device_loader_layout_and_dtype():
    loader = DeviceLoader(small_set(), 8, dtype=torch.bfloat16, channels_last=True, mean=MEAN, std=STD)
    images, labels = next(iter(loader))
    assert images.dtype == torch.bfloat16 and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    rgb = DeviceLoader(small_set(channels=3), 8, channels_last=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    images, _ = next(iter(rgb))
    assert images.shape == (8, 3, 7, 7) and images.is_contiguous(memory_format=torch.channels_last)
    assert images.stride(1) == 1


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prepared_images_serve_bitwise_what_per_batch_normalization_serves(monkeypatch, channels, channels_last,
                                                                           dtype):
    from fastcnn.data import device_loader

    data = small_set(count=50, channels=channels)
    kw = dict(seed=5, mean=(0.5, 0.4, 0.3)[:channels], std=(0.2, 0.25, 0.3)[:channels], dtype=dtype,
              channels_last=channels_last)
    prepared = DeviceLoader(data, 16, **kw)
    monkeypatch.setattr(device_loader, "PREPARED_MAX_BYTES", 0)  # too big to prepare: normalize per batch
    per_batch = DeviceLoader(data, 16, **kw)
    assert prepared.prepared is not None and per_batch.prepared is None
    served = 0
    for (a, y_a), (b, y_b) in zip(prepared, per_batch, strict=True):
        assert torch.equal(a, b) and torch.equal(y_a, y_b)
        assert a.dtype == b.dtype and a.is_contiguous(memory_format=per_batch.memory_format)
        if channels > 1:
            assert a.stride() == b.stride()
        served += 1
    assert served == 4


def test_torch_loader_serves_the_same_batches_as_device_loader():
    data = small_set(channels=3)
    kw = dict(seed=7, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    served = 0
    for (a, b), (c, d) in zip(DeviceLoader(data, 9, **kw), TorchLoader(data, 9, **kw), strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
        served += 1
    assert served == 12


def test_values_equal_torchvision_totensor_normalize_on_real_mnist(data_root):
    reference = datasets.MNIST(str(data_root), train=False, download=False,
                               transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    test = load_dataset("mnist", False, root=data_root, download=False)
    assert len(test) == MNIST_SPLIT_SIZES[1] and test.image_shape == (1, 28, 28)
    loader = DeviceLoader(test, 1000, shuffle=False, mean=MEAN, std=STD)
    images, labels = next(iter(loader))
    for i in (0, 1, 7, 500, 999):
        expected, label = reference[i]
        assert torch.equal(images[i], expected)
        assert labels[i].item() == label


def test_fashion_mnist_loads(data_root):
    train = load_dataset("fashion-mnist", True, root=data_root, download=False)
    assert len(train) == MNIST_SPLIT_SIZES[0] and train.num_classes == 10
    assert train.classes[0] == "T-shirt/top"


def test_synthetic_is_deterministic_and_split_dependent():
    a = synthetic_dataset(50, seed=1)
    b = synthetic_dataset(50, seed=1)
    test = synthetic_dataset(50, seed=1, train=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, test.images)
    assert a.images.shape == (50, 1, 28, 28) and a.images.dtype == torch.uint8


@pytest.mark.parametrize("channels_last, dtype", [(False, torch.float32), (True, torch.float32),
                                                  (True, torch.bfloat16)])
def test_serving_into_given_tensors_serves_the_same_batches(channels_last, dtype):
    # What a CUDA graph's static inputs receive (DeviceLoader.serve_into): the batches an unbound loader serves,
    # bitwise, in the caller's two tensors for every full batch; the smaller last batch in new ones.
    data = small_set(count=5 * 16 + 3, channels=3)
    options = dict(seed=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), channels_last=channels_last, dtype=dtype)
    plain, bound = DeviceLoader(data, 16, **options), DeviceLoader(data, 16, **options)
    first_images, first_labels = next(iter(plain))
    images = first_images.clone(memory_format=torch.preserve_format)
    labels = first_labels.clone()
    assert bound.serve_into(images, labels)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        bound.set_epoch(epoch)
        served = 0
        for (x, y), (bx, by) in zip(plain, bound, strict=True):
            full = y.shape[0] == 16
            assert (bx is images and by is labels) == full
            assert torch.equal(bx, x) and torch.equal(by, y) and bx.stride() == x.stride()
            served += 1
        assert served == 6
    assert not bound.serve_into(None)  # back to new tensors
    assert all(x is not images for x, _ in bound)


def test_serving_into_refuses_tensors_unlike_a_full_batch(monkeypatch):
    data = small_set(count=40, channels=3)  # with one channel, NCHW and channels-last memory are the same
    loader = DeviceLoader(data, 8, channels_last=True, mean=0.13, std=0.31)
    images, labels = next(iter(loader))
    images, labels = images.clone(memory_format=torch.preserve_format), labels.clone()
    assert not loader.serve_into(images.contiguous(), labels)  # NCHW memory for a channels-last loader
    assert not loader.serve_into(images.double(), labels)
    assert not loader.serve_into(images[:4], labels[:4])
    assert not loader.serve_into(images, labels.int())
    assert loader.serve_into(images, labels)
    assert not loader.serve_into(images, None) and loader._destination is None  # a refusal unbinds
    monkeypatch.setattr("fastcnn.data.device_loader.PREPARED_MAX_BYTES", 0)  # no normalized copy resident
    assert not DeviceLoader(data, 8, channels_last=True, mean=0.13, std=0.31).serve_into(images, labels)
    assert loader.serve_into(images, labels)  # a loader with its copy still takes them


def test_channel_stats_are_the_exact_per_channel_mean_and_population_std():
    data = small_set(count=40, channels=3)
    data.images[:, 2] = 77  # a constant channel: std 1.0, so that normalizing by it stays finite
    mean, std = channel_stats(data.images)
    pixels = data.images.double() / 255
    assert mean[:2] == pytest.approx(pixels.mean(dim=(0, 2, 3))[:2].tolist(), abs=1e-12)
    assert std[:2] == pytest.approx(pixels.std(dim=(0, 2, 3), correction=0)[:2].tolist(), abs=1e-12)
    assert mean[2] == pytest.approx(77 / 255) and std[2] == 1.0
    assert data.channel_stats() == (mean, std)


def test_normalize_uint8_is_totensor_then_normalize_bitwise():
    pixels = small_set(count=5, channels=3).images
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ours = normalize_uint8(pixels, as_channel_tensor(mean, 3, "cpu"), as_channel_tensor(std, 3, "cpu"))
    assert torch.equal(ours, transforms.Normalize(mean, std)(pixels.float() / 255))


def test_channel_tensors_repeat_one_value_and_refuse_a_wrong_count():
    assert as_channel_tensor(0.5, 3, "cpu").flatten().tolist() == [0.5] * 3
    assert as_channel_tensor(MNIST_NORM[0], 3, "cpu").shape == (1, 3, 1, 1)
    with pytest.raises(ValueError, match="2 normalization values for 3 channels"):
        as_channel_tensor((0.1, 0.2), 3, "cpu")


def test_image_shapes_parse_describe_and_convert():
    assert parse_image_size(28) == (28, 28) and parse_image_size((24, 32)) == (24, 32)
    assert parse_image_size(None) is None
    with pytest.raises(ValueError, match="at least 1x1"):
        parse_image_size((0, 5))
    assert describe_shape((3, 32, 32)) == "RGB 3x32x32" and describe_shape((1, 28, 28)) == "grayscale 1x28x28"
    gray = small_set(count=4, channels=1).images
    assert convert_images(gray, 1, 7) is gray  # already that shape: the same tensor
    rgb = convert_images(gray, 3)
    assert rgb.shape == (4, 3, 7, 7) and all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))
    assert torch.equal(convert_images(rgb, 1), gray)  # equal R, G and B: the luma is that value
    assert convert_images(gray, 1, (14, 5)).shape == (4, 1, 14, 5)


def test_dali_stays_optional_and_its_probe_imports_only_dali():
    # The data package imports without DALI, and asking whether DALI runs imports DALI, not fastcnn's loader.
    probe = ("import sys, fastcnn.data; from fastcnn.data.dali_status import dali_status; "
             "before = 'nvidia.dali' in sys.modules; dali_status(); "
             "print(before, 'fastcnn.data.dali_loader' in sys.modules, 'fastcnn.data.imagefolder' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]


def test_a_failed_download_is_said_in_a_few_words():
    from urllib.error import URLError

    from fastcnn.data.mnist import download_failure

    mirrors = RuntimeError("Error downloading train-images-idx3-ubyte.gz: Tried https://a/, got: <urlopen error "
                           "[Errno -2] Name or service not known> Tried http://b/, got: <urlopen error [Errno -2] "
                           "Name or service not known>")
    assert download_failure(mirrors) == "no network: Name or service not known"
    assert download_failure(URLError("timed out")) == "no network: timed out"
    assert download_failure(OSError("x" * 500)).endswith("...")
