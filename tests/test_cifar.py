"""CIFAR-10 (``--dataset cifar10``) in both distributed formats, generated here: the pickled batches read without
running pickled code (a crafted batch that would run code if unpickled naively must not), the binary batches, and
the one-line errors for missing and broken files."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from helpers import run_cli

from fastcnn.data import load_dataset
from fastcnn.data.cifar import (
    BIN_FOLDER,
    CLASSES,
    PY_FOLDER,
    RECORD,
    TEST_BATCHES,
    TRAIN_BATCHES,
    load_cifar10,
    write_py_batch,
)
from fastcnn.errors import DatasetError

NAMES = TRAIN_BATCHES + TEST_BATCHES


def batches(count: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{batch name: (uint8 (count, 3, 32, 32), labels)}: each class a colour, so that a model can learn it."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (10, 3, 1, 1))
    made = {}
    for name in NAMES:
        labels = rng.integers(0, 10, count)
        images = (palette[labels] + rng.integers(-20, 21, (count, 3, 32, 32))).clip(0, 255).astype(np.uint8)
        made[name] = images, labels
    return made


def py2_pickle(value) -> bytes:
    """``value`` pickled the way the original CIFAR-10 files were (Python 2 cPickle, protocol 2): str as
    SHORT_BINSTRING / BINSTRING, and a numpy array as numpy.core.multiarray._reconstruct + BUILD with its bytes
    as a (Python 2) str."""
    out = bytearray(b"\x80\x02")

    def string(text: bytes):
        out.extend(b"U" + bytes([len(text)]) + text if len(text) < 256 else b"T" + struct.pack("<I", len(text)) + text)

    def emit(v):
        if isinstance(v, dict):
            out.extend(b"}(")
            for key, item in v.items():
                emit(key)
                emit(item)
            out.extend(b"u")
        elif isinstance(v, list):
            out.extend(b"](")
            for item in v:
                emit(item)
            out.extend(b"e")
        elif isinstance(v, str):
            string(v.encode("latin1"))
        elif isinstance(v, (int, np.integer)):
            out.extend(b"J" + struct.pack("<i", int(v)))
        elif isinstance(v, np.ndarray):
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R")
            out.extend(b"(K\x01")
            out.extend(b"(" + b"".join(b"J" + struct.pack("<i", n) for n in v.shape) + b"t")
            out.extend(b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            out.extend(b"\x89")  # NEWFALSE: C order
            string(np.ascontiguousarray(v).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(v))

    emit(value)
    return bytes(out + b".")


def write_py(root, made, *, style="py3"):
    folder = root / PY_FOLDER
    folder.mkdir(parents=True)
    for name, (images, labels) in made.items():
        if style == "py3":
            write_py_batch(folder / name, images, labels)
        else:
            batch = {"batch_label": name, "labels": [int(v) for v in labels], "data": images.reshape(len(images), -1),
                     "filenames": [f"{i}.png" for i in range(len(images))]}
            (folder / name).write_bytes(py2_pickle(batch))
    meta = {"num_cases_per_batch": 10000, "label_names": CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta) if style == "py2" else pickle.dumps(meta, protocol=2))
    return folder


def write_bin(root, made):
    folder = root / BIN_FOLDER
    folder.mkdir(parents=True)
    for name, (images, labels) in made.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
        records.tofile(folder / f"{name}.bin")
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return folder


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_pickled_batches_are_read_exactly(tmp_path, style):
    made = batches(12)
    write_py(tmp_path, made, style=style)
    train, test = load_cifar10(tmp_path, True), load_cifar10(tmp_path, False)
    assert train.name == "cifar10" and train.classes == CLASSES and train.source == str(tmp_path / PY_FOLDER)
    assert train.images.dtype == torch.uint8 and train.images.shape == (60, 3, 32, 32) and len(test) == 12
    expected = np.concatenate([made[name][0] for name in TRAIN_BATCHES])
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == np.concatenate([made[name][1] for name in TRAIN_BATCHES]).tolist()
    assert torch.equal(test.images, torch.from_numpy(made["test_batch"][0]))


def test_binary_batches_are_read_exactly_and_the_py_version_comes_first(tmp_path):
    made = batches(7)
    write_bin(tmp_path, made)
    train, test = load_cifar10(tmp_path, True), load_cifar10(tmp_path, False)
    assert train.images.shape == (35, 3, 32, 32) and train.classes == CLASSES
    assert torch.equal(test.images, torch.from_numpy(made["test_batch"][0]))
    assert test.labels.tolist() == made["test_batch"][1].tolist()
    write_py(tmp_path, batches(3, seed=1))
    assert len(load_cifar10(tmp_path, False)) == 3  # torchvision's layout wins when both are there


class RunsCode:
    """Unpickled naively, this creates the file ``marker`` (os.system would do the same with any command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("where", ["batch", "in the data", "meta"])
def test_a_crafted_pickle_does_not_run_code(tmp_path, where):
    made = batches(4)
    folder = write_py(tmp_path, made)
    marker = tmp_path / "code-ran"
    evil = RunsCode(marker)
    if where == "batch":
        target, payload = folder / "data_batch_3", pickle.dumps(evil, protocol=2)
    elif where == "in the data":
        target = folder / "data_batch_3"
        payload = pickle.dumps({"data": made["data_batch_3"][0].reshape(4, -1), "labels": [1, 2, 3, evil]})
    else:
        target, payload = folder / "batches.meta", pickle.dumps({"label_names": evil})
    target.write_bytes(payload)
    pickle.loads(payload, encoding="latin1")  # what torchvision's CIFAR10 does: it runs the code
    assert marker.exists()
    marker.rmdir()
    with pytest.raises(DatasetError) as caught:
        load_cifar10(tmp_path, True)
    message = str(caught.value)
    assert message.startswith(f"refusing {target}: it is a pickle that asks for posix.mkdir") and "\n" not in message
    assert not marker.exists()


def test_files_that_are_not_cifar_batches(tmp_path):
    made = batches(4)
    folder = write_py(tmp_path, made)
    batch = folder / "data_batch_2"
    cases = {b"not a pickle at all": "is not a CIFAR-10 batch (",
             pickle.dumps([1, 2, 3], protocol=2): "holds a list, not a dict",
             pickle.dumps({"data": np.zeros((4, 10), np.uint8), "labels": [0] * 4}): "not uint8 (N, 3072)",
             pickle.dumps({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}): "numpy dtype 'f4'",
             pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}): "4 images but 3 labels",
             pickle.dumps({"pixels": 1}): "has no 'data' entry"}
    for payload, words in cases.items():
        batch.write_bytes(payload)
        with pytest.raises(DatasetError) as caught:
            load_cifar10(tmp_path, True)
        assert words in str(caught.value) and str(batch) in str(caught.value), (words, str(caught.value))
    batch.write_bytes(pickle.dumps({"data": made["data_batch_2"][0].reshape(4, -1), "labels": [0, 1, 2, 10]}))
    with pytest.raises(DatasetError, match="reach 10, but there are 10 classes"):
        load_cifar10(tmp_path, True)
    batch.unlink()
    with pytest.raises(DatasetError, match="data_batch_2 is missing"):
        load_cifar10(tmp_path, True)
    binary = write_bin(tmp_path / "bin", made) / "test_batch.bin"
    binary.write_bytes(binary.read_bytes()[:RECORD * 2 + 5])
    with pytest.raises(DatasetError, match=f"is not a whole number of {RECORD}-byte records"):
        load_cifar10(tmp_path / "bin", False)


def test_missing_dataset_is_one_line_and_a_failed_download_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(DatasetError) as caught:
        load_cifar10(tmp_path / "nowhere", True, download=False)
    assert "CIFAR-10 not found under" in str(caught.value) and PY_FOLDER in str(caught.value)
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match="the download failed \\(network is unreachable\\)"):
        load_cifar10(tmp_path / "data", True)
    assert not (tmp_path / "data").exists()


def test_load_dataset_converts_cifar_on_request(tmp_path):
    write_bin(tmp_path, batches(5))
    gray = load_dataset("cifar10", False, root=tmp_path, channels=1, image_size=16)
    assert gray.images.shape == (5, 1, 16, 16) and "converted to grayscale 1x16x16" in gray.notes[0]
    assert load_dataset("cifar10", True, root=tmp_path, subset=7).images.shape == (7, 3, 32, 32)


def test_train_eval_and_predict_on_cifar(tmp_path, capsys):
    """The CLI end to end: RGB 32x32 with the train split's own statistics, eval and predict see it the same way."""
    from PIL import Image

    made = batches(40)
    write_py(tmp_path / "data", made)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-progress",
                              "--model", "lenet", "--epochs", "2", "--output", str(run)], capsys)
    assert code == 0, err
    opening = out.splitlines()[0]
    assert opening.startswith(f"training on cifar10 {tmp_path / 'data' / PY_FOLDER}: 200 train / 40 test images, "
                              "10 classes (airplane, automobile, bird, cat, ...), RGB 3x32x32, mean ")
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    train = np.concatenate([made[name][0] for name in TRAIN_BATCHES]) / 255
    assert checkpoint["config"]["mean"] == pytest.approx(train.mean(axis=(0, 2, 3)).tolist(), abs=1e-12)
    assert checkpoint["config"]["std"] == pytest.approx(train.std(axis=(0, 2, 3)).tolist(), abs=1e-12)
    assert checkpoint["image_shape"] == [3, 32, 32] and checkpoint["classes"] == CLASSES
    code, out, err = run_cli(["eval", str(run / "checkpoint.pt")], capsys)
    assert code == 0, err
    assert "on the cifar10 test split" in out
    paths = []
    for index, image in enumerate(made["test_batch"][0][:5]):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(image.transpose(1, 2, 0)).save(paths[-1])
    code, out, err = run_cli(["predict", str(run / "checkpoint.pt"), *paths], capsys)
    assert code == 0 and len(out.splitlines()) == 5 and err == "", err
