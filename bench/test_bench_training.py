"""Training-step throughput of the ablation configurations, as pytest-benchmark suites.

    pytest bench/test_bench_training.py --benchmark-json=bench/results/training-<device>.json

The same configurations as ``fastcnn bench --ablation`` (reference -> device-resident data -> channels-last ->
AMP -> torch.compile -> fused kernel -> CUDA graph, and DALI), for simplecnn at batch 64 and 512 and lenet at
batch 100, on synthetic data. Configurations this machine cannot run skip with the reason. One benchmark round
is ``STEPS`` training steps (data loading included) ending with a device synchronization; compilation and
autotuning are paid in the untimed warm-up.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

from fastcnn import env
from fastcnn.bench_configs import ABLATION, BENCH_CONFIGS, configured
from fastcnn.build import build_trainer, load_splits, pay_one_time_costs
from fastcnn.config import TrainConfig, resolve
from fastcnn.engine import synchronize
from fastcnn.errors import FastcnnError

STEPS = 20
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="TRITON_INTERPRET=1 would time the Triton interpreter; unset it")


@pytest.mark.parametrize("model, batch_size", [("simplecnn", 64), ("simplecnn", 512), ("lenet", 100)])
@pytest.mark.parametrize("config", ABLATION + ["fast"])
def test_training_step_throughput(benchmark, config, model, batch_size):
    base = TrainConfig(model=model, dataset="synthetic", synthetic_size=(20_000, 1_000), batch_size=batch_size,
                       progress=False)
    try:
        rc = resolve(configured(base, BENCH_CONFIGS[config]))
    except FastcnnError as unavailable:
        pytest.skip(str(unavailable))
    train_set, test_set = load_splits(rc)
    trainer, train_loader, test_loader = build_trainer(rc, train_set, test_set)
    # as fastcnn bench's step mode
    pay_one_time_costs(rc, trainer, train_loader, test_loader, always=True, evaluate=False)
    if rc.torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not warm-up's
    stream = itertools.chain.from_iterable(itertools.repeat(train_loader))

    def steps():
        for _ in range(STEPS):
            trainer.train_step(*next(stream))
        synchronize(rc.torch_device)

    benchmark.extra_info.update(config=config, model=model, batch_size=batch_size, steps_per_round=STEPS,
                                device=env.device_name(rc.torch_device), versions=env.versions(),
                                settings=dataclasses.asdict(rc))
    benchmark.pedantic(steps, rounds=5, warmup_rounds=1)
    benchmark.extra_info["images_per_second"] = STEPS * batch_size / benchmark.stats.stats.median
    if rc.torch_device.type == "cuda":
        benchmark.extra_info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
