"""Datasets and loaders: every sample once per epoch, with its label, with the reference loader's values."""

import pytest
import torch
from helpers import small_set
from torchvision import datasets, transforms

from fastcnn.data import DeviceLoader, TorchLoader, load_dataset, synthetic_dataset
from fastcnn.data.sampling import epoch_permutation, shard

MEAN, STD = (0.1307,), (0.3081,)


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
    assert {s.numel() for s in shards} == {25}
    union = torch.cat(shards)
    assert union.unique().numel() == 100


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
    for (a, y_a), (b, y_b) in zip(prepared, per_batch, strict=True):
        assert torch.equal(a, b) and torch.equal(y_a, y_b)
        assert a.dtype == b.dtype and a.is_contiguous(memory_format=per_batch.memory_format)
        if channels > 1:
            assert a.stride() == b.stride()


def test_torch_loader_serves_the_same_batches_as_device_loader():
    data = small_set(channels=3)
    kw = dict(seed=7, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    for (a, b), (c, d) in zip(DeviceLoader(data, 9, **kw), TorchLoader(data, 9, **kw), strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_values_equal_torchvision_totensor_normalize_on_real_mnist(data_root):
    reference = datasets.MNIST(str(data_root), train=False, download=False,
                               transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    test = load_dataset("mnist", False, root=data_root, download=False)
    assert len(test) == 10_000 and test.image_shape == (1, 28, 28)
    loader = DeviceLoader(test, 1000, shuffle=False, mean=MEAN, std=STD)
    images, labels = next(iter(loader))
    for i in (0, 1, 7, 500, 999):
        expected, label = reference[i]
        assert torch.equal(images[i], expected)
        assert labels[i].item() == label


def test_fashion_mnist_loads(data_root):
    train = load_dataset("fashion-mnist", True, root=data_root, download=False)
    assert len(train) == 60_000 and train.num_classes == 10
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
