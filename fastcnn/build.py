"""Everything a run needs before its first step, built from a ResolvedConfig: the data splits in the run's shape,
the loaders (this rank's shard of the train split, the whole test split), the seeded model and its Trainer, and
the warm-up that pays one-time costs (compilation, autotuning, kernel choice) before the clock starts."""

from __future__ import annotations

import dataclasses

import torch

from fastcnn.config import ResolvedConfig
from fastcnn.data import ImageDataset, load_dataset, make_loader
from fastcnn.distributed import DistributedContext, per_rank_batch_size
from fastcnn.engine import Trainer, synchronize
from fastcnn.kernel_choice import KernelTiming, fused_is_an_option
from fastcnn.models import build_model

EVAL_BATCH_SIZE = 1000  # test batches: at least this many images (or the run's batch size, when larger)


def load_splits(rc: ResolvedConfig) -> tuple[ImageDataset, ImageDataset]:
    """The run's train and test splits, in the shape it asks for (``channels`` / ``image_size``; None: the
    dataset's own, inferred from the train split for an image folder), the test split in the train split's."""
    kwargs = dict(root=rc.data_dir, download=rc.download, synthetic_size=rc.synthetic_size, seed=rc.seed)
    train = load_dataset(rc.dataset, True, channels=rc.channels, image_size=rc.image_size, subset=rc.train_subset,
                         **kwargs)
    channels, height, width = train.image_shape
    test = load_dataset(rc.dataset, False, channels=channels, image_size=(height, width), subset=rc.test_subset,
                        **kwargs)
    return train, test


def fit_to_data(rc: ResolvedConfig, train_set: ImageDataset) -> ResolvedConfig:
    """``rc`` with what the loaded data decides: the shape it trains on and, where the configuration leaves the
    normalization to the data, the train split's per-channel mean and std."""
    channels, height, width = train_set.image_shape
    changes = dict(channels=channels, image_size=(height, width))
    if rc.mean is None or rc.std is None:
        mean, std = train_set.channel_stats()
        changes.update(mean=tuple(mean), std=tuple(std))
    return dataclasses.replace(rc, **changes)


def build_loaders(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, *, rank: int = 0,
                  world_size: int = 1):
    """Train loader (this rank's shard, its share of the global batch) and test loader (the whole test set)."""
    # The device loader can emit the autocast dtype directly: the first layer would cast it anyway.
    dtype = rc.autocast_dtype if (rc.amp and rc.loader != "torch") else torch.float32
    mean, std = (rc.mean, rc.std) if rc.mean is not None else train_set.channel_stats()
    options = dict(device=rc.torch_device, seed=rc.seed, mean=mean, std=std, dtype=dtype,
                   channels_last=rc.channels_last)
    if rc.loader == "torch":
        options["num_workers"] = rc.num_workers
    augmentation = dict(augment=rc.augment, flip=rc.flip) if rc.loader == "dali" else {}
    train_loader = make_loader(rc.loader, train_set, per_rank_batch_size(rc.batch_size, world_size), shuffle=True,
                               rank=rank, world_size=world_size, **options, **augmentation)
    eval_kind = "torch" if rc.loader == "torch" else "device"
    eval_options = {k: v for k, v in options.items() if k != "num_workers" or eval_kind == "torch"}
    test_loader = make_loader(eval_kind, test_set, max(rc.batch_size, EVAL_BATCH_SIZE), shuffle=False,
                              **eval_options)
    return train_loader, test_loader


def build_trainer(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, *, rank: int = 0,
                  world_size: int = 1, distributed: bool | None = None):
    """Model (seeded), optimizer and loaders for ``rc``: everything a run needs before its first step.
    ``distributed``: wrap the model in DistributedDataParallel (default: when world_size > 1)."""
    train_loader, test_loader = build_loaders(rc, train_set, test_set, rank=rank, world_size=world_size)
    torch.manual_seed(rc.seed)
    model = build_model(rc.model, kernel=rc.kernel, reference_impl=rc.reference_model,
                        num_classes=train_set.num_classes, image_shape=train_set.image_shape, widths=rc.widths)
    trainer = Trainer(model, device=rc.torch_device, opt=rc.opt, lr=rc.lr, amp_dtype=rc.autocast_dtype,
                      channels_last=rc.channels_last, compile=rc.compile, compile_mode=rc.compile_mode,
                      betas=rc.betas, label_smoothing=rc.label_smoothing, schedule=rc.schedule,
                      total_steps=rc.epochs * len(train_loader),
                      distributed=world_size > 1 if distributed is None else distributed,
                      cuda_graph=rc.cuda_graph, fused_optimizer=rc.fused_optimizer)
    return trainer, train_loader, test_loader


def pay_one_time_costs(rc: ResolvedConfig, trainer: Trainer, train_loader, test_loader,
                       ctx: DistributedContext | None = None, known_kernels: list[KernelTiming] | None = None, *,
                       always: bool = False, evaluate: bool = True, last_batch: bool = True) -> float:
    """Pay one-time costs (compilation, autotuning, kernel choice) before the clock starts, by warming ``trainer``
    up (``Trainer.warm_up``) when the run has any; returns their seconds. Model, optimizer and RNG are put back as
    they were, so training itself is unchanged.

    ``kernel="auto"`` is decided here by measurement (``known_kernels``: a resumed run's, not measured again);
    with several processes rank 0 measures and every rank takes its choices. Training warms up only where there
    is something to pay in advance; benchmarks pass ``always`` (a GPU's first steps pay cuBLAS and cuDNN set-up
    too), and ``evaluate=False`` / ``last_batch=False`` when they will not time those shapes."""
    seconds = 0.0
    ctx = ctx or DistributedContext()
    # kernel="auto" measures wherever it may pick the fused kernel (on CUDA; tests let the CPU take part)
    may_fuse = (rc.kernel == "fused" and rc.device == "cuda") or (
        rc.kernel == "auto" and fused_is_an_option(rc.torch_device))
    if always or rc.compile or rc.cuda_graph or may_fuse:
        shapes = batch_shapes(train_loader)
        seconds = trainer.warm_up(shapes if last_batch else shapes[:1],
                                  batch_shapes(test_loader) if evaluate else [],
                                  known_kernels=known_kernels or (), measure_kernels=ctx.is_main,
                                  agree_on_kernels=ctx.from_main if ctx.enabled else None)
    synchronize(rc.torch_device)
    return seconds


def batch_shapes(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A batch of every size an epoch of ``loader`` serves: a full one and, when the last is smaller, one of that
    size (cut from the first), so that warm-up compiles for both."""
    images, labels = next(iter(loader))
    remainder = 0 if getattr(loader, "drop_last", False) else loader.num_samples % loader.batch_size
    if remainder and remainder < images.shape[0]:
        return [(images, labels), (images[:remainder], labels[:remainder])]
    return [(images, labels)]
