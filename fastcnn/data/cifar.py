"""CIFAR-10 (``--dataset cifar10``) as an ImageDataset: uint8 (N, 3, 32, 32), ten classes.

Two layouts under the data root, as distributed at https://www.cs.toronto.edu/~kriz/cifar.html:

- ``cifar-10-batches-py/`` (torchvision's layout; what ``torchvision.datasets.CIFAR10`` downloads): pickled
  batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a dict with ``data`` (a uint8 numpy array
  of 10,000 x 3,072: 1,024 red, 1,024 green, 1,024 blue values per image, rows in order) and ``labels``; and
  ``batches.meta`` with ``label_names``.
- ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``, 10,000 records of
  one label byte and the same 3,072 pixel bytes; ``batches.meta.txt`` with a class name per line.

A pickle can run any code when it is loaded, and torchvision loads these files with plain ``pickle.load``. Here
they are read with a restricted unpickler (``BatchUnpickler``): the only globals it resolves are the few numpy
names a pickled uint8 array refers to, and they resolve to fastcnn's own stand-ins that build the array with
``numpy.frombuffer`` from checked bytes, never to numpy's own unpickling code. Any other global (``os.system``,
``builtins.eval``, ...) stops the load with a one-line error before it is called. When neither folder exists the
py version is downloaded with torchvision's helpers (checked against torchvision's MD5), when the network allows.
"""

from __future__ import annotations

import codecs
import io
import pathlib
import pickle
import shutil

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets import utils as torchvision_utils

from fastcnn.data.error_text import one_line
from fastcnn.data.image_dataset import ImageDataset
from fastcnn.errors import DatasetError

PY_FOLDER, BIN_FOLDER = "cifar-10-batches-py", "cifar-10-batches-bin"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PIXELS = 3 * 32 * 32
RECORD = 1 + PIXELS  # the binary version: a label byte, then the pixels
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# dtypes a pickled array in a batch may have: the pixels are uint8; labels are lists, sometimes integer arrays
ALLOWED_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}


def load_cifar10(root: pathlib.Path, train: bool, *, download: bool = True) -> ImageDataset:
    """The train (50,000) or test (10,000) split of CIFAR-10 under ``root``: the py layout when present, else
    the binary one, else a download (when ``download``). DatasetError (one line) for a missing, corrupt or
    suspicious file."""
    root = pathlib.Path(root)
    py, binary = root / PY_FOLDER, root / BIN_FOLDER
    if not py.is_dir() and not binary.is_dir():
        _download(root, download)
    names = TRAIN_BATCHES if train else TEST_BATCHES
    if py.is_dir():
        parts = [read_py_batch(py / name) for name in names]
        classes = _py_classes(py / "batches.meta")
    else:
        parts = [read_bin_batch(binary / f"{name}.bin") for name in names]
        classes = _bin_classes(binary / "batches.meta.txt")
    images = torch.from_numpy(np.concatenate([images for images, _ in parts]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in parts]))
    if labels.numel() and int(labels.max()) >= len(classes):
        raise DatasetError(f"CIFAR-10 labels under {py if py.is_dir() else binary} reach {int(labels.max())}, but "
                           f"there are {len(classes)} classes; re-download the dataset from {URL}")
    return ImageDataset("cifar10", images, labels, classes, source=str(py if py.is_dir() else binary))


def _hint(root: pathlib.Path) -> str:
    return (f"put {PY_FOLDER}/ (torchvision's layout) or {BIN_FOLDER}/ from {URL} under {root}, or point --data-dir "
            "/ FASTCNN_DATA at their parent folder")


def _download(root: pathlib.Path, download: bool) -> None:
    what = f"CIFAR-10 not found under {root} (neither {PY_FOLDER}/ nor {BIN_FOLDER}/)"
    if not download:
        raise DatasetError(f"{what}; {_hint(root)}")
    created = not root.exists()
    try:
        torchvision_utils.download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename,
                                                       md5=CIFAR10.tgz_md5)
    except Exception as failed:  # no network, a mirror down, a bad checksum: say what failed and what to do
        if created:
            shutil.rmtree(root, ignore_errors=True)  # leave nothing behind from a failed download
        else:
            (root / CIFAR10.filename).unlink(missing_ok=True)
            shutil.rmtree(root / PY_FOLDER, ignore_errors=True)
        reason = one_line(failed) or type(failed).__name__
        raise DatasetError(f"{what} and the download failed ({reason}); {_hint(root)}") from None


def read_py_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """A pickled batch: (uint8 (N, 3, 32, 32), int64 (N,)), read with ``BatchUnpickler``."""
    batch = _unpickle(path)
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path} is not a CIFAR-10 batch: its 'data' is {got}, not uint8 (N, {PIXELS}); "
                           f"re-download it from {URL}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(f"{path} is not a CIFAR-10 batch: its 'labels' are not integers; re-download it from "
                           f"{URL}") from None
    if labels.shape[0] != data.shape[0] or (labels.size and labels.min() < 0):
        raise DatasetError(f"{path} is not a CIFAR-10 batch: {data.shape[0]} images but {labels.shape[0]} labels "
                           f"(or negative ones); re-download it from {URL}")
    return data.reshape(-1, 3, 32, 32), labels


def read_bin_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """A binary batch: (uint8 (N, 3, 32, 32), int64 (N,))."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the binary CIFAR-10 folder; re-download it from {URL}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        raise DatasetError(f"{path} is not a CIFAR-10 batch: {raw.size} bytes is not a whole number of "
                           f"{RECORD}-byte records; re-download it from {URL}")
    records = raw.reshape(-1, RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), records[:, 0].astype(np.int64)


def _field(batch, name: str, path: pathlib.Path):
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict; "
                           f"re-download it from {URL}")
    for key in (name, name.encode()):
        if key in batch:
            return batch[key]
    raise DatasetError(f"{path} is not a CIFAR-10 batch: it has no {name!r} entry (keys: "
                       f"{', '.join(repr(k) for k in list(batch)[:6])}); re-download it from {URL}")


def _unpickle(path: pathlib.Path):
    if not path.is_file():
        raise DatasetError(f"{path} is missing from {path.parent}; re-download CIFAR-10 from {URL}")
    try:
        with open(path, "rb") as file:
            return BatchUnpickler(file, encoding="latin1").load()
    except ForbiddenGlobal as forbidden:
        raise DatasetError(f"refusing {path}: it is a pickle that asks for {forbidden}, which a CIFAR-10 batch never "
                           f"holds (loading it could run code); replace it with the original file from {URL}") from None
    except Exception as err:  # not a pickle, truncated, a bad array state, ...
        reason = one_line(err, 160) or type(err).__name__
        raise DatasetError(f"{path} is not a CIFAR-10 batch ({type(err).__name__}: {reason}); re-download it "
                           f"from {URL}") from None


def _py_classes(path: pathlib.Path) -> list[str]:
    if not path.is_file():
        return list(CLASSES)
    names = _field(_unpickle(path), "label_names", path)
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, bytes)) for n in names):
        raise DatasetError(f"{path} is not CIFAR-10's batches.meta: 'label_names' is not a list of names")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def _bin_classes(path: pathlib.Path) -> list[str]:
    if not path.is_file():
        return list(CLASSES)
    names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return names or list(CLASSES)


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that no CIFAR batch holds."""


class _ArrayStandIn:
    """Where numpy.ndarray's pickled state lands (the BUILD opcode calls ``__setstate__``); ``array`` then builds
    the real array from the checked bytes."""

    def __init__(self, shape=None, dtype=None, data=None, fortran=False):
        self.shape, self.dtype, self.data, self.fortran = shape, dtype, data, fortran

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("unexpected numpy array state")
        self.shape, self.dtype, self.fortran, self.data = state[-4:]

    def array(self) -> np.ndarray:
        dtype = self.dtype.numpy() if isinstance(self.dtype, _DtypeStandIn) else None
        if dtype is None:
            raise pickle.UnpicklingError("numpy array without a dtype")
        data = self.data.encode("latin1") if isinstance(self.data, str) else self.data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise pickle.UnpicklingError(f"numpy array data of type {type(data).__name__}")
        shape = tuple(int(v) for v in self.shape)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
            raise pickle.UnpicklingError(f"numpy array of shape {shape} with {len(data)} bytes of data")
        return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order="F" if self.fortran else "C")


class _DtypeStandIn:
    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or code.lstrip("<>|=") not in ALLOWED_DTYPES:
            raise pickle.UnpicklingError(f"numpy dtype {code!r} (a CIFAR batch holds integers)")
        self.code, self.order = code.lstrip("<>|="), "<"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(("" if self.order == "|" else {"=": "<"}.get(self.order, self.order)) + self.code)


def _reconstruct(cls, shape, dtype_code):
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("numpy _reconstruct of something other than an ndarray")
    return _ArrayStandIn()


def _frombuffer(buffer, dtype, shape, order):
    if not isinstance(dtype, _DtypeStandIn):
        raise pickle.UnpicklingError("numpy array without a dtype")
    return _ArrayStandIn(shape, dtype, buffer, order == "F")


def _encode(text, encoding="utf-8"):
    """``_codecs.encode``: how protocol-2 pickles written by Python 3 spell a bytes object."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, encoding)


_NDARRAY = object()  # the stand-in for the class numpy.ndarray


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that knows only the globals of a pickled numpy integer array, mapped to stand-ins."""

    GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DtypeStandIn,
        ("_codecs", "encode"): _encode,
    }

    def find_class(self, module, name):
        try:
            return self.GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None

    def load(self):
        return _realize(super().load())


def _realize(value):
    """Replace every stand-in array in the unpickled structure by the numpy array it describes."""
    if isinstance(value, _ArrayStandIn):
        return value.array()
    if isinstance(value, dict):
        return {key: _realize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_realize(item) for item in value]
    return value


def write_py_batch(path: pathlib.Path, images: np.ndarray, labels, **extra) -> None:
    """Write a batch in the py layout, as the original files are (protocol 2, a uint8 array and a label list):
    for tests and for converting other data to CIFAR's format."""
    data = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), PIXELS)
    batch = {"batch_label": extra.pop("batch_label", path.name), "labels": [int(v) for v in labels], "data": data,
             "filenames": extra.pop("filenames", [f"{i:05d}.png" for i in range(len(images))]), **extra}
    buffer = io.BytesIO()
    pickle.dump(batch, buffer, protocol=2)
    path.write_bytes(buffer.getvalue())
