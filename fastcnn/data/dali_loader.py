"""DaliLoader: DeviceLoader's batches, produced by an NVIDIA DALI pipeline.

The uint8 dataset stays resident on the training device (GPU memory on a GPU). Each batch is gathered there with
the epoch's permutation (``fastcnn.data.sampling``, drawn on the device) and handed to the pipeline through
``fn.external_source`` in batch mode, without a host round-trip on a GPU; DALI operators then do the rest:
``fn.crop_mirror_normalize`` normalizes (as ToTensor + Normalize), casts and lays the batch out as CHW or HWC,
optionally after a random translation (``fn.slice`` with padding) and a horizontal flip (its ``mirror``).
Without a GPU (``device="cpu"``) the same pipeline runs CPU-only (``device_id=None``).

Execution model. The pipeline is built once and reused for every epoch. It is run with
``prefetch_queue_depth=1`` and the inputs passed to ``run()`` directly: every batch is cut from memory on demand,
so there is no I/O to hide. On a GPU the gathered batch is fed on the caller's CUDA stream (DALI copies it there,
ordered after the gather) and ``run(stream)`` orders the outputs on that stream; DALI's own kernels run on its
internal stream in between, so a batch's preparation and the training step do not overlap (whether a loading
stream one batch ahead pays is for a GPU to measure). On a CPU a prefetched batch would only compete with the
training step for the same cores. It also means an epoch abandoned half-way (``next(iter(loader))``) leaves
nothing in flight.
``exec_async`` and ``exec_pipelined`` stay on, which selects DALI's dynamic executor: its outputs are
reference-counted buffers, handed to torch with DLPack (no copy).

Buffer lifetime. DALI's classic executors reuse output buffers, so a consumer that keeps a batch across
iterations of a ``DALIGenericIterator`` must copy it. With the dynamic executor used here, each yielded tensor
owns its DALI buffer: measured on CPU (DALI 2.4), a batch kept across later iterations and epochs is unchanged
(``tests/test_dali_loader.py`` checks it), so no copy is made. On a GPU this relies on the same DLPack contract
that ``DALIGenericIterator`` uses in its no-copy mode (not measured here).

Values. fp32 images equal DeviceLoader's (ToTensor + Normalize) to within two fp32 ulps of the largest |value|, not
bitwise: DALI's CPU operator computes ``(x - 255 m) / (255 s)``, its GPU operator ``fmaf(x, 1 / (255 s), -m / s)``,
torchvision ``(x / 255 - m) / s`` with three roundings. (On a GPU, a mean that is a whole multiple of 1/255 leaves
about 5e-8 instead of 0 at that pixel value.) float16 is emitted by DALI. DALI cannot emit bfloat16
(crop_mirror_normalize writes float32, float16, int8 and uint8 only), so bfloat16 (and float64) batches are emitted
as float32 by DALI and cast by torch, as DeviceLoader does. For every pixel value 0..255 under the MNIST,
Fashion-MNIST, ImageNet and 0.5/0.5 statistics, the float16 and bfloat16 values were bitwise DeviceLoader's
(tests/test_dali_loader.py on the CPU; the GPU formula, simulated in fp32 on the CPU, gives the same).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from fastcnn.data.dali_runtime import output_to_torch, pipeline_stream, usable_cores
from fastcnn.data.dali_status import dali_gpu_status
from fastcnn.data.device_loader import ResidentLoader
from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.sampling import epoch_seed, shard
from fastcnn.errors import NotAvailableError

# Distinct from the permutation's seed so that the augmentation draws do not repeat the shuffle's.
AUGMENT_SALT = 0x5A17_DA11


def dali_threads(gpu: bool) -> int:
    """CPU threads for a DALI pipeline. A CPU pipeline's batch is small work (~0.5 ms for 64 MNIST images) that
    runs while the training step waits: on a 2-core machine one thread was faster than two (batch 64: 0.56 vs
    0.65 ms; batch 1000: 3.9 vs 4.5 ms, DALI 2.4), so a CPU pipeline gets a thread per two cores, a GPU pipeline
    (whose CPU side only feeds inputs) one per core; at most 4."""
    cores = usable_cores()
    return max(1, min(4, cores if gpu else cores // 2))


@pipeline_def
def _batch_pipeline(*, device: str, height: int, width: int, mean: list[float], std: list[float],
                    out_dtype, out_layout: str, augment: bool, flip: bool, no_copy: bool):
    # uint8 (N, C, H, W) from the resident dataset, gathered by the loader: CHW samples, N may vary per batch.
    images = fn.external_source(name="images", device=device, layout="CHW", dtype=types.UINT8, ndim=3,
                                batch=True, no_copy=no_copy)
    mirror = 0
    if augment:
        # Per-sample (dy, dx) drawn by the loader; the window reaches out of the image and is zero-filled, i.e.
        # pad + random crop: the picture moves by (-dy, -dx) over a black background (pixel value 0).
        start = fn.external_source(name="start", device="cpu", dtype=types.INT32, ndim=1, batch=True)
        images = fn.slice(images, start=start, shape=[height, width], axis_names="HW",
                          out_of_bounds_policy="pad", fill_values=0, device=device)
        if flip:
            mirror = fn.external_source(name="mirror", device="cpu", dtype=types.INT32, ndim=0, batch=True)
    return fn.crop_mirror_normalize(images, device=device, mean=mean, std=std, mirror=mirror, dtype=out_dtype,
                                    output_layout=out_layout)


class DaliLoader(ResidentLoader):
    """Serves ``(images, labels)`` batches of ``dataset`` on ``device``, made by a DALI pipeline.

    Same constructor, attributes and batches as ``DeviceLoader`` (same seed: same samples in the same batches in
    the same order); images: ``dtype`` (N, C, H, W), normalized like ToTensor + Normalize(mean, std),
    channels-last strides when asked (a permuted view of DALI's NHWC output, no copy); labels: int64 (N,).

    Augmentation (off by default): ``augment=True`` translates each image by up to ``max_shift`` pixels in each
    direction (zero fill); ``flip=True`` also mirrors half of them horizontally (only when asked: a mirrored digit
    is another digit). The draws depend only on (seed, epoch, position in the epoch), so a resumed epoch
    (``set_epoch(e, start_batch)``) sees the same augmented batches as an uninterrupted one.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, augment: bool = False, flip: bool = False,
                 max_shift: int = 2, num_threads: int | None = None):
        if not dtype.is_floating_point:
            raise ValueError(f"DaliLoader emits floating-point images, not {dtype}")
        if flip and not augment:
            raise ValueError("flip=True needs augment=True (flipping is part of the augmentation)")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        device = torch.device(device)
        if device.type == "cuda":
            gpu_ok, why = dali_gpu_status()
            if not gpu_ok:
                raise NotAvailableError(f"the DALI loader cannot run on {device}: {why}; use --loader device")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            device_id, dali_device = device.index, "gpu"
        elif device.type == "cpu":
            device_id, dali_device = None, "cpu"  # CPU-only pipeline: no CUDA needed at all
        else:
            raise ValueError(f"DaliLoader runs on cpu or cuda devices, not {device}")
        super().__init__(dataset, batch_size, device=device, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         mean=mean, std=std, dtype=dtype, channels_last=channels_last, rank=rank,
                         world_size=world_size)
        height, width = self.images.shape[2:]
        mean_values = self.mean.flatten().tolist()
        std_values = self.std.flatten().tolist()
        self.augment, self.flip, self.max_shift = augment, flip, max_shift
        self.pipeline = _batch_pipeline(
            device=dali_device, height=height, width=width,
            mean=[m * 255 for m in mean_values], std=[s * 255 for s in std_values],
            out_dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT,
            out_layout="HWC" if channels_last else "CHW", augment=augment, flip=flip,
            # CPU: DALI reads the gathered batch in place (it is done with it when run() returns);
            # GPU: DALI copies it on the caller's stream, which orders it before torch reuses the memory.
            no_copy=dali_device == "cpu",
            batch_size=max(1, min(batch_size, self.num_samples)),
            num_threads=num_threads or dali_threads(gpu=dali_device == "gpu"), device_id=device_id,
            seed=epoch_seed(seed, rank) % (2**31), prefetch_queue_depth=1, exec_async=True, exec_pipelined=True)
        self.pipeline.build()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        start, mirror = self._augmentation(order.numel()) if self.augment else (None, None)
        on_gpu = self.device.type == "cuda"
        stream = pipeline_stream(self.device)
        for batch in range(self.start_batch, len(self)):
            lo, hi = batch * self.batch_size, (batch + 1) * self.batch_size
            index = order[lo:hi]
            pixels = self.images.index_select(0, index)
            # Fed on the loader device's stream, not the current device's (what run(**inputs) would use), so that
            # DALI's copy of the batch is ordered after the gather even when another GPU is current.
            self.pipeline.feed_input("images", pixels if on_gpu else pixels.numpy(), cuda_stream=stream)
            if start is not None:
                self.pipeline.feed_input("start", start[lo:hi])
            if mirror is not None:
                self.pipeline.feed_input("mirror", mirror[lo:hi])
            (out,) = self.pipeline.run(stream)
            yield self._to_torch(out), self.labels.index_select(0, index)

    def _augmentation(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The epoch's per-position slice starts (count, 2) int32 = -(dy, dx), and mirror flags (count,) int32.

        Drawn on the CPU (DALI takes argument inputs from host memory) for all positions of the epoch before
        sharding, so each rank's samples get their own draws."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) ^ AUGMENT_SALT)
        total = self.labels.numel()
        start = torch.randint(-self.max_shift, self.max_shift + 1, (total, 2), generator=generator,
                              dtype=torch.int32)
        mirror = torch.randint(0, 2, (total,), generator=generator, dtype=torch.int32) if self.flip else None
        start = shard(start, self.rank, self.world_size)[:count].contiguous().numpy()
        if mirror is not None:
            mirror = shard(mirror, self.rank, self.world_size)[:count].contiguous().numpy()
        return start, mirror

    def _to_torch(self, out) -> torch.Tensor:
        images = output_to_torch(out, self.device)
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels-last strides
        if images.dtype != self.dtype:  # bfloat16 / float64: DALI wrote float32
            images = images.to(self.dtype)
        return images
