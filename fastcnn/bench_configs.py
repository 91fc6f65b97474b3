"""The named configurations ``fastcnn bench`` measures, and the ablation's order of them.

Torch-free (the CLI builds its --help from ``ABLATION`` before it imports torch). Each configuration is a set of
TrainConfig overrides applied on top of what the user passed, so that two lines of a bench table differ only in
what their names say.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fastcnn.errors import UsageError


@dataclass(frozen=True)
class BenchConfig:
    """A named configuration: TrainConfig overrides on top of what the user passed."""

    name: str
    description: str
    overrides: dict = field(default_factory=dict)
    # Whether the line adds one optimization to the line before it (its "vs previous" is that optimization's
    # gain); a line that replaces a component instead (DALI for the device loader) has no "vs previous".
    adds_to_previous: bool = True


_REFERENCE = dict(preset="reference")
_DEVICE = dict(preset="reference", loader="device", kernel="aten")
_CL = dict(_DEVICE, channels_last=True)
_AMP = dict(_CL, amp=True)
_COMPILE = dict(_AMP, compile=True)
_FUSED = dict(_COMPILE, kernel="fused")
_FUSED_OPT = dict(_FUSED, fused_optimizer=True)
_GRAPH = dict(_FUSED_OPT, cuda_graph=True)

BENCH_CONFIGS = {c.name: c for c in (
    BenchConfig("reference", "the tutorial program: DataLoader + per-sample transforms, eager fp32 NCHW", _REFERENCE),
    BenchConfig("device", "+ dataset resident on the device, batches gathered there", _DEVICE),
    BenchConfig("channels-last", "+ channels-last layout", _CL),
    BenchConfig("amp", "+ autocast mixed precision (bf16, or fp16 with a GradScaler)", _AMP),
    BenchConfig("compile", "+ torch.compile (the model, and the loss with the count of right predictions)", _COMPILE),
    BenchConfig("fused", "+ the fused Conv-ReLU-Pool kernel (Triton on a GPU, native C on a CPU)", _FUSED),
    BenchConfig("fused-opt", "+ the optimizer's fused implementation (one kernel per step)", _FUSED_OPT),
    BenchConfig("cuda-graph", "+ whole training step captured as a CUDA graph", _GRAPH),
    BenchConfig("dali", "the fast preset with the NVIDIA DALI loader in place of the device loader",
                dict(preset="fast", loader="dali"), adds_to_previous=False),
    BenchConfig("fast", "fastcnn's fast preset for this device (what `fastcnn train` runs)", dict(preset="fast"),
                adds_to_previous=False),
    BenchConfig("fast-default-opt", "the fast preset with torch's default optimizer (foreach) instead of the fused "
                "one", dict(preset="fast", fused_optimizer=False), adds_to_previous=False),
    # The fast preset less one choice: whether each still pays at a given batch size. At the tutorial's batch a
    # GPU step is a string of tiny kernels, where autocast's weight casts and channels-last's layout copies are
    # extra kernels that may cost more than they save.
    BenchConfig("fast-fp32", "the fast preset without autocast (float32 throughout)", dict(preset="fast", amp=False),
                adds_to_previous=False),
    BenchConfig("fast-nchw", "the fast preset without channels-last (NCHW throughout)",
                dict(preset="fast", channels_last=False), adds_to_previous=False),
    BenchConfig("fast-aten", "the fast preset with the aten chain (cuDNN on a GPU) in place of auto's choice",
                dict(preset="fast", kernel="aten"), adds_to_previous=False),
    # The fused kernel without torch.compile: what the CPU fast preset runs (compile does not pay on a CPU), so the
    # ablation shows the native kernel's own gain over the "amp" line; on a GPU, the Triton kernel run eagerly.
    BenchConfig("fused-eager", "the amp line + the fused Conv-ReLU-Pool kernel, no torch.compile",
                dict(_AMP, kernel="fused"), adds_to_previous=False),
)}
# Names earlier versions used, still accepted on the command line; tables and JSON say the current name.
CONFIG_ALIASES = {"fast-cudnn": "fast-aten"}
ABLATION = ["reference", "device", "channels-last", "amp", "compile", "fused", "fused-opt", "cuda-graph", "dali",
            "fused-eager"]


def parse_configs(text: str) -> list[BenchConfig]:
    """``--configs`` (comma-separated names, old names included) as configurations, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCH_CONFIGS and name not in CONFIG_ALIASES]
    if unknown or not names:
        raise UsageError(f"unknown bench configuration(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from: {', '.join(BENCH_CONFIGS)}")
    configs = [BENCH_CONFIGS[CONFIG_ALIASES.get(name, name)] for name in names]
    seen = set()
    for name, config in zip(names, configs, strict=True):
        if config.name in seen:
            also = f" ({name} is its old name)" if name != config.name else ""
            raise UsageError(f"bench configuration {config.name} is given twice{also}; name each one once")
        seen.add(config.name)
    return configs


def configured(base, bench: BenchConfig):
    """The user's options (a TrainConfig), then the configuration's: a bench line differs from the others only in
    these."""
    return dataclasses.replace(base, **bench.overrides)


def format_config_list() -> str:
    """``fastcnn bench --list``: one aligned line per configuration, then the ablation's order."""
    old_names = {new: old for old, new in CONFIG_ALIASES.items()}
    width = max(len(name) for name in BENCH_CONFIGS)
    lines = [f"{config.name:<{width}}  {config.description}" +
             (f" (old name: {old_names[config.name]})" if config.name in old_names else "")
             for config in BENCH_CONFIGS.values()]
    return "\n".join(lines + ["", f"--ablation runs: {', '.join(ABLATION)}"])
