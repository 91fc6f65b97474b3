"""Training configuration: what the user asked for (``TrainConfig``, ``None`` = let the preset decide) and
what will run (``resolve`` fills every field for the chosen device, and rejects what cannot run here).

Presets:
- ``reference``: the tutorial program exactly: torch DataLoader with per-sample transforms, the tutorial's own
  model class, eager fp32, contiguous NCHW.
- ``fast``: what measurably helps on the device. CPU (a 2-core machine, measured in the README's results):
  device-resident data, channels-last, bf16 autocast, the fused optimizer, and the fused op's native CPU kernel
  (``kernel="auto"``: where measured faster, by default where it is built); torch.compile stays off there
  because it was slower. CUDA: the same plus torch.compile, the fused Triton kernel (``kernel="auto"``: where
  measured faster) and whole-step CUDA graphs, unless the run asks for something a graph cannot capture
  (float16, SGD, a compile mode with graphs of its own): then the preset leaves graphs off, where an explicit
  ``--cuda-graph`` would be refused.
Explicit flags always override the preset.

Data shape and normalization. ``channels`` / ``image_size`` left at None keep the dataset's own shape (an image
folder's is inferred from its images); the resolved configuration of a run records the shape it trained on.
MNIST, Fashion-MNIST and synthetic data are normalized as the model's tutorial does (or the recipe says); every
other dataset (image folders, CIFAR-10) with its train split's own per-channel mean and std, computed after the
data is loaded (``mean``/``std`` are None until then) and recorded in the checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastcnn.data import DATASETS, LOADERS
from fastcnn.data.dali_status import dali_gpu_status, dali_status
from fastcnn.data.image_shape import CHANNEL_CHOICES
from fastcnn.engine import SCHEDULES
from fastcnn.errors import FastcnnError, NotAvailableError, UsageError
from fastcnn.models import get_spec
from fastcnn.ops import fused_kernel_status, native_runs_on_cpu
from fastcnn.recipes import default_dataset, get_recipe
from fastcnn.vocabulary import KERNEL_ALIASES, KERNELS, canonical_kernel

PRESETS = ("fast", "reference")
OPTIMIZERS = ("adam", "sgd")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_BATCH_SIZE = 1 << 20
# Datasets normalized as the model's tutorial (or the recipe) says; the others with their train split's statistics
TUTORIAL_NORMALIZED = ("mnist", "fashion-mnist", "synthetic")


@dataclass
class TrainConfig:
    """A training run as asked for. Fields left at None are decided by the preset and the model's recipe."""

    model: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    download: bool = True
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    opt: str | None = None
    seed: int = 0
    device: str = "auto"
    preset: str | None = None
    recipe: str | None = None
    runs: int = 1
    schedule: str | None = None
    betas: tuple[float, float] | None = None
    label_smoothing: float | None = None
    eval_every: int = 0
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std); default: the model's
    loader: str | None = None
    amp: bool | None = None
    amp_dtype: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    compile_mode: str | None = None
    cuda_graph: bool | None = None
    kernel: str | None = None
    fused_optimizer: bool | None = None
    output: str | None = None
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True
    verbose: bool = False  # also print what is normally held back (the torchrun command, torchrun's own warnings)
    train_subset: int | None = None
    test_subset: int | None = None
    synthetic_size: tuple[int, int] = (60_000, 10_000)
    target_acc: float | None = None
    num_workers: int = 0
    deterministic: bool = False
    augment: bool | None = None  # None: off, unless the recipe turns it on
    flip: bool | None = None
    widths: tuple[int, int, int] | None = None
    channels: int | None = None  # 1 or 3; None: the dataset's own
    image_size: tuple[int, int] | None = None  # (height, width); None: the dataset's own


@dataclass(frozen=True)
class ResolvedConfig:
    """Every choice made: this is what runs, and what summary.json records."""

    model: str
    dataset: str
    data_dir: str | None
    download: bool
    epochs: int
    batch_size: int
    lr: float
    opt: str
    seed: int
    device: str
    preset: str
    loader: str
    amp: bool
    amp_dtype: str
    channels_last: bool
    compile: bool
    compile_mode: str
    cuda_graph: bool
    kernel: str
    reference_model: bool
    mean: tuple[float, ...] | None  # None: the train split's own, filled in once the data is loaded
    std: tuple[float, ...] | None
    train_subset: int | None
    test_subset: int | None
    synthetic_size: tuple[int, int]
    target_acc: float | None
    num_workers: int
    recipe: str | None = None
    schedule: str = "constant"
    betas: tuple[float, float] | None = None
    label_smoothing: float = 0.0
    eval_every: int = 0
    deterministic: bool = False
    augment: bool = False
    flip: bool = False
    widths: tuple[int, int, int] | None = None
    fused_optimizer: bool = False  # a default, so that checkpoints from before the option still resume
    channels: int | None = None  # what was asked before the data is loaded; what it trained on after
    image_size: tuple[int, int] | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp_dtype] if self.amp else None

    def to_dict(self) -> dict:
        """The JSON form that summary.json and checkpoints record (tuples as lists)."""
        data = dataclasses.asdict(self)
        for key in _TUPLE_FIELDS:
            data[key] = list(data[key]) if data[key] is not None else None
        return data

    @classmethod
    def from_dict(cls, saved: dict, *, image_shape=None) -> ResolvedConfig:
        """The configuration ``to_dict`` recorded, from a checkpoint of this or an older fastcnn: keys it no longer
        knows are dropped, and one from before shapes were recorded gets ``image_shape`` (the checkpoint's; every
        dataset was then decoded to 1x28x28). TypeError when a field it needs is missing."""
        saved = dict(saved)
        for key in _TUPLE_FIELDS:
            if saved.get(key) is not None:
                saved[key] = tuple(saved[key])
        if "image_size" not in saved:
            image_shape = image_shape or (1, 28, 28)
            saved["channels"], saved["image_size"] = int(image_shape[0]), tuple(int(v) for v in image_shape[1:])
        if saved.get("kernel") in KERNEL_ALIASES:  # recorded before the implementations were named fused and aten
            saved["kernel"] = canonical_kernel(saved["kernel"])
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in fields})


_TUPLE_FIELDS = ("mean", "std", "synthetic_size", "betas", "widths", "image_size")


def config_for_resume(state: dict, cfg: TrainConfig, checkpoint: str) -> ResolvedConfig:
    """What a resumed run trains with: the checkpoint's own configuration, where only --epochs (to train longer)
    and --data-dir may change. Refuses what cannot continue here (in one line naming ``checkpoint``)."""
    try:
        rc = ResolvedConfig.from_dict(state["config"], image_shape=state.get("image_shape"))
    except TypeError as err:
        raise FastcnnError(f"checkpoint {checkpoint} has an incompatible configuration ({err})") from None
    changes = {}
    if cfg.epochs is not None:
        _require(cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}")
        changes["epochs"] = cfg.epochs
    if cfg.data_dir is not None:
        changes["data_dir"] = cfg.data_dir
    rc = dataclasses.replace(rc, **changes)
    if rc.device == "cuda" and not torch.cuda.is_available():
        raise FastcnnError(f"checkpoint {checkpoint} was trained on CUDA but no GPU is visible; resume it on a GPU")
    if state["epoch"] >= rc.epochs:
        raise UsageError(f"checkpoint {checkpoint} already finished {state['epoch']} of {rc.epochs} epochs; "
                         f"pass --epochs N with N > {state['epoch']} to train longer")
    return rc


def pick_device(requested: str) -> str:
    if requested not in DEVICES:
        raise UsageError(f"unknown device {requested!r}; choose one of: {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise NotAvailableError("--device cuda was given but no CUDA GPU is visible to torch "
                                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                                "use --device cpu or --device auto")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def preset_defaults(preset: str, device: str) -> dict:
    """The options a preset turns on for a device type (see the module docstring for the measurements)."""
    if preset == "reference":
        return dict(loader="torch", amp=False, channels_last=False, compile=False, cuda_graph=False,
                    kernel="aten", fused_optimizer=False, reference_model=True)
    on_gpu = device == "cuda"
    # The fused optimizer: one kernel for all parameters instead of ~16 foreach ops per Adam step. On a GPU each
    # launch costs microseconds of a step that is tens of microseconds long. On this CPU: 1.09x per epoch, median
    # of 5 interleaved rounds (bench/results/cpu-epoch-fused-optimizer.json); 1.03x and 1.04x in two earlier runs.
    return dict(loader="device", amp=True, channels_last=True, compile=on_gpu, cuda_graph=on_gpu,
                kernel="auto", fused_optimizer=True, reference_model=False)


def default_amp_dtype(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def resolve(cfg: TrainConfig) -> ResolvedConfig:
    """Fill in every option from the preset and the model's tutorial recipe (or a named ``--recipe``); reject
    impossible requests."""
    if cfg.recipe is not None:
        cfg = apply_recipe(cfg)
    spec = get_spec(cfg.model or "simplecnn")
    preset = cfg.preset or "fast"
    _require(preset in PRESETS, f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    recipe = spec.recipe
    dataset = cfg.dataset or recipe.dataset
    _require(dataset in DATASETS, f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    epochs = recipe.epochs if cfg.epochs is None else cfg.epochs
    batch_size = recipe.batch_size if cfg.batch_size is None else cfg.batch_size
    lr = recipe.lr if cfg.lr is None else cfg.lr
    opt = cfg.opt or recipe.opt
    schedule = cfg.schedule or "constant"
    _require(schedule in SCHEDULES, f"unknown --sched {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    label_smoothing = cfg.label_smoothing or 0.0
    _require(0.0 <= label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    _require(cfg.betas is None or all(0.0 <= b < 1.0 for b in cfg.betas),
             f"--betas must be two numbers in [0, 1), got {cfg.betas}")
    _require(cfg.eval_every >= 0, f"--eval-every must be >= 0 steps, got {cfg.eval_every}")
    _require(cfg.runs >= 1, f"--runs must be at least 1, got {cfg.runs}")
    if cfg.normalize is not None:
        mean, std = cfg.normalize
    elif dataset in TUTORIAL_NORMALIZED and recipe.mean is not None:
        mean, std = recipe.mean, recipe.std
    else:
        mean, std = None, None  # the train split's own statistics, once it is loaded
    _require(cfg.channels is None or cfg.channels in CHANNEL_CHOICES,
             f"--channels must be 1 (grayscale) or 3 (RGB), got {cfg.channels}")
    _require(cfg.image_size is None or min(cfg.image_size) >= 1,
             f"--image-size must be at least 1 pixel, got {cfg.image_size}")
    _require(epochs >= 1, f"--epochs must be at least 1, got {epochs}")
    _require(1 <= batch_size <= MAX_BATCH_SIZE,
             f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    _require(lr > 0 and lr == lr and lr != float("inf"), f"--lr must be a positive finite number, got {lr}")
    _require(opt in OPTIMIZERS, f"unknown optimizer {opt!r}; choose one of: {', '.join(OPTIMIZERS)}")
    for name in ("train_subset", "test_subset"):
        value = getattr(cfg, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    _require(cfg.target_acc is None or 0 < cfg.target_acc <= 100,
             f"--target-acc is a test accuracy in percent (0, 100], got {cfg.target_acc}")
    _require(cfg.num_workers >= 0, f"--workers must be >= 0, got {cfg.num_workers}")

    device = pick_device(cfg.device)
    chosen = preset_defaults(preset, device)
    for key in ("loader", "amp", "channels_last", "compile", "cuda_graph", "kernel", "fused_optimizer"):
        if getattr(cfg, key) is not None:
            chosen[key] = getattr(cfg, key)
    if cfg.kernel is not None and preset == "reference":
        chosen["reference_model"] = False  # --kernel asks for fastcnn's model with that implementation
    _require(chosen["loader"] in LOADERS, f"unknown loader {chosen['loader']!r}; choose one of: {', '.join(LOADERS)}")
    _require(chosen["kernel"] in (*KERNELS, *KERNEL_ALIASES),
             f"unknown kernel {chosen['kernel']!r}; choose one of: {', '.join((*KERNELS, *KERNEL_ALIASES))}")
    chosen["kernel"] = canonical_kernel(chosen["kernel"])  # triton and torch, the older names, mean fused and aten
    amp_dtype = cfg.amp_dtype or default_amp_dtype(device)
    _require(amp_dtype in AMP_DTYPES, f"unknown --amp-dtype {amp_dtype!r}; choose one of: {', '.join(AMP_DTYPES)}")
    compile_mode = cfg.compile_mode or "default"
    _require(compile_mode in COMPILE_MODES,
             f"unknown --compile-mode {compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
    _require(not cfg.flip or cfg.augment, "--flip is a kind of augmentation: add --augment")
    _require(not cfg.augment or chosen["loader"] == "dali",
             "--augment is done by the DALI loader on the device: add --loader dali")
    if chosen["cuda_graph"] and cfg.cuda_graph is None and cuda_graph_conflict(chosen, device, amp_dtype, opt,
                                                                                compile_mode):
        chosen["cuda_graph"] = False  # the preset's default yields to what was asked; --cuda-graph would be refused
    _check_available(chosen, device, amp_dtype, opt, compile_mode)
    return ResolvedConfig(
        model=spec.name, dataset=dataset, data_dir=cfg.data_dir, download=cfg.download, epochs=epochs,
        batch_size=batch_size, lr=lr, opt=opt, seed=cfg.seed, device=device, preset=preset,
        loader=chosen["loader"], amp=chosen["amp"], amp_dtype=amp_dtype, channels_last=chosen["channels_last"],
        compile=chosen["compile"], compile_mode=compile_mode, cuda_graph=chosen["cuda_graph"],
        kernel=chosen["kernel"], reference_model=chosen["reference_model"],
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
        train_subset=cfg.train_subset, test_subset=cfg.test_subset,
        synthetic_size=tuple(cfg.synthetic_size), target_acc=cfg.target_acc, num_workers=cfg.num_workers,
        recipe=cfg.recipe, schedule=schedule, betas=tuple(cfg.betas) if cfg.betas else None,
        label_smoothing=label_smoothing, eval_every=cfg.eval_every, deterministic=cfg.deterministic,
        augment=bool(cfg.augment), flip=bool(cfg.flip), widths=tuple(cfg.widths) if cfg.widths else None,
        fused_optimizer=chosen["fused_optimizer"], channels=cfg.channels,
        image_size=tuple(cfg.image_size) if cfg.image_size else None)


def apply_recipe(cfg: TrainConfig) -> TrainConfig:
    """Fill the options a named recipe decides, leaving every explicitly given flag as it is."""
    dataset = cfg.dataset or default_dataset(cfg.recipe)
    recipe = get_recipe(cfg.recipe, dataset)
    device_settings = recipe.device_settings.get(pick_device(cfg.device), {})
    chosen = dict(model=recipe.model, widths=recipe.widths, dataset=dataset,
                  batch_size=recipe.batch_size, lr=recipe.lr, opt=recipe.opt, betas=recipe.betas,
                  schedule=recipe.schedule, label_smoothing=recipe.label_smoothing, epochs=recipe.epochs,
                  normalize=recipe.norm,  # a recipe normalizes per dataset, not per model
                  **recipe.settings, **device_settings)
    return dataclasses.replace(cfg, **{k: v for k, v in chosen.items() if getattr(cfg, k) is None})


def cuda_graph_conflict(chosen: dict, device: str, amp_dtype: str, opt: str, compile_mode: str) -> str | None:
    """Why a whole-step CUDA graph cannot capture this run, as a sentence ending in what to do; None if it can."""
    if device != "cuda":
        return "--cuda-graph needs a CUDA GPU (this run is on the CPU); drop the flag"
    if chosen["amp"] and amp_dtype == "float16":
        return ("--cuda-graph cannot capture float16 training: its GradScaler checks for infinities on the host "
                "every step; use --amp-dtype bfloat16 or --no-amp")
    if opt == "sgd":
        return "--cuda-graph needs --opt adam: SGD with a tensor learning rate reads it on the host every step"
    if chosen["compile"] and compile_mode not in ("default", "max-autotune-no-cudagraphs"):
        return (f"--compile-mode {compile_mode} makes CUDA graphs of its own; with --cuda-graph use --compile-mode "
                "default or max-autotune-no-cudagraphs")
    return None


def _check_available(chosen: dict, device: str, amp_dtype: str, opt: str, compile_mode: str) -> None:
    """Fail with a clear message, before any work, for options this build or this machine cannot run."""
    if chosen["cuda_graph"]:
        conflict = cuda_graph_conflict(chosen, device, amp_dtype, opt, compile_mode)
        if conflict:
            raise NotAvailableError(conflict)
    if chosen["loader"] == "dali":
        ok, why = dali_status()
        if not ok:
            raise NotAvailableError(f"--loader dali is not available here: {why}; use --loader device")
        if device == "cuda":
            ok, why = dali_gpu_status()
            if not ok:
                raise NotAvailableError(f"--loader dali cannot use the GPU here: {why}; use --loader device")
    if chosen["amp"] and amp_dtype == "float16" and device == "cpu":
        raise NotAvailableError("--amp-dtype float16 needs a CUDA GPU (the CPU autocasts to bfloat16); "
                                "use --amp-dtype bfloat16 or --no-amp")
    if chosen["kernel"] == "fused":
        ok, why = fused_kernel_status(torch.device(device))
        if not ok:
            raise NotAvailableError(f"--kernel fused cannot run here: {why}; use --kernel auto or aten")
        if device == "cpu" and chosen["compile"] and not native_runs_on_cpu():
            raise NotAvailableError("--kernel fused on the CPU runs the Triton interpreter, which torch.compile "
                                    "cannot trace; use --no-compile, or --kernel auto")
