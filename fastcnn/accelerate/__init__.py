"""``fastcnn.accelerate(model)``: run every ``Conv2d -> ReLU -> MaxPool2d(2, 2)`` chain of a user's model as
one fused :class:`~fastcnn.nn.ConvReLUPool2d`, without changing a single weight or state_dict key.

The steps, one module each: ``match`` reads the module tree (torch.fx, one forward at a time, and
``nn.Sequential`` items) and plans, for every chain, the cheapest way to fuse it that keeps the whole tree
consistent, whoever calls which submodule, or why it cannot be fused; ``rewrite`` copies the tree and carries the
plans out; ``report`` is what the user reads:

- *module swap*: conv, ReLU and pool are modules called only by this chain: the conv becomes the fused module
  and the ReLU and pool modules become ``nn.Identity``. No code changes; the model keeps its class.
- *sequential slots*: the same inside an ``nn.Sequential`` whose ReLU / pool module objects are shared by
  several of its slots: only this chain's slots become ``nn.Identity``.
- *forward rewrite*: the chain is written with functional calls (``F.relu``, ``torch.relu``, ``x.relu_()``,
  ``F.max_pool2d``, ...) or with ReLU / pool modules shared by several chains: the module that owns that
  ``forward`` gets a subclass of its own class whose ``forward`` is the fx graph without the ReLU and pool.

Anything else is left exactly as it was and listed, with the reason, in the report.

``fastcnn.accelerate`` is both this package and, once ``fastcnn`` is imported, the function ``accelerate``
(``fastcnn/__init__.py`` binds the attribute to the function): ``fastcnn.accelerate(model)`` and
``from fastcnn.accelerate import accelerate`` both work, and so do ``from fastcnn.accelerate import match`` and
``from fastcnn.accelerate.match import plan``; an attribute path through the function
(``fastcnn.accelerate.match``, ``import fastcnn.accelerate.match as m``) does not.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcnn.accelerate.match import ModuleTree, find_chains, plan
from fastcnn.accelerate.report import AccelerateReport, ChainEntry, TraceFailure, accelerate_report
from fastcnn.accelerate.rewrite import _new_rewritten, apply_plans, copy_tree, refuse_frozen_forwards  # noqa: F401
from fastcnn.vocabulary import canonical_kernel

# _new_rewritten is imported for the pickles of rewritten models saved before fastcnn.accelerate became a
# package: they name their loader fastcnn.accelerate._new_rewritten.

__all__ = ["accelerate", "accelerate_report", "AccelerateReport", "ChainEntry", "TraceFailure"]


def accelerate(model: nn.Module, *, fuse: bool = True, channels_last: bool = False,
               compile: bool | dict = False, kernel: str = "auto", verbose: bool = False) -> nn.Module:
    """Return ``model`` with every ``Conv2d -> ReLU -> MaxPool2d(2, 2)`` chain run by one ``ConvReLUPool2d``.

    Contract:

    - **A new module, the same weights.** The result is a new module tree (same classes, same attributes,
      same qualified names); the object passed in is not modified: its class, ``forward`` and children stay
      as they were. Every parameter and buffer of the result *is* the original's tensor (not a copy): the
      two are two views of one set of weights, so training, ``load_state_dict``, ``.to(device)`` or
      ``channels_last`` on either shows in both. ``model = fastcnn.accelerate(model)`` is the intended use.
    - **Same state_dict.** The fused module is ``ConvReLUPool2d.from_conv(conv)`` installed at the conv's
      qualified name and sharing its ``weight`` / ``bias``; replaced ReLU / pool modules hold no state. Keys,
      their order and values are unchanged, and state_dicts load both ways between original and result.
    - **Same numbers.** Outputs and gradients equal the original's (ReLU and 2x2 max pooling commute, so
      ``Conv2d -> MaxPool2d -> ReLU`` is fused too). Inputs of fused convs must be batched (N, C, H, W).
    - **What fuses.** A ``Conv2d`` module the fused kernels can compute (``fastcnn.kernels.contract``: stride 1,
      dilation 1, groups 1, square kernel <= 7, padding <= kernel // 2 with ``padding_mode="zeros"``) and with
      nothing a plain Conv2d lacks (hooks, its own forward, parametrizations), whose output goes only to a ReLU
      (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in-place variants) whose output goes only to a
      2x2 max pool (``nn.MaxPool2d`` / ``F.max_pool2d`` / ``torch.max_pool2d``, kernel 2, stride 2 or
      default, padding 0, dilation 1, no ``ceil_mode``, no indices), in either order, and a conv called from
      that one place only. Everything else is left as it was and listed in the report with the reason.
    - **Tracing.** Each module whose ``forward`` can reach a conv is traced by torch.fx with its children as
      opaque calls; a ``forward`` that fx cannot trace (data-dependent control flow, ...) is left as written
      and only its ``nn.Sequential`` items and traceable submodules are fused (the report says which module
      failed and why). A rewritten ``forward`` is the traced one: Python-level branches on attributes are
      frozen at this call (``self.training`` excepted: a forward that depends on it is not rewritten). Its
      class is a generated subclass of the original that pickles (``torch.save(model)``, ``copy.deepcopy``)
      by tracing the original forward again when loaded.
    - ``channels_last=True`` converts parameters and buffers to ``torch.channels_last``. ``compile=True`` (or
      a dict of ``torch.compile`` keyword arguments) compiles the result in place with
      ``nn.Module.compile``, so it stays the same module with the same state_dict keys (no ``_orig_mod.``).
      ``fuse=False`` skips the rewriting and applies only these two.
    - ``kernel`` (``"auto"`` | ``"fused"`` | ``"aten"``; the old ``"triton"`` and ``"torch"`` too) is passed to
      every ``ConvReLUPool2d``.

    The report (:class:`AccelerateReport`) is the ``fastcnn_report`` attribute of the result, also returned by
    :func:`accelerate_report` (which prints nothing); ``verbose=True`` prints it here, once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate() expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError("accelerate() got a torch.compile'd module: pass the module itself and compile=True")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("accelerate() got a TorchScript module: pass the eager nn.Module")
    kernel = canonical_kernel(kernel)
    if not isinstance(compile, bool | dict):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")

    result = copy_tree(model)
    report = AccelerateReport(kernel=kernel, fuse=fuse, channels_last=channels_last, compiled=bool(compile))
    if fuse:
        _fuse_chains(result, kernel, report)
    if channels_last:
        result.to(memory_format=torch.channels_last)
    result.fastcnn_report = report
    if compile:
        result.compile(**(compile if isinstance(compile, dict) else {}))
    if verbose:
        print(report)
    return result


def _fuse_chains(root: nn.Module, kernel: str, report: AccelerateReport) -> None:
    tree = ModuleTree(root)  # who calls which module; every forward that can reach a conv, traced
    report.trace_failures.extend(tree.trace_failures)
    plans = [plan(tree, chain) for chain in find_chains(tree)]  # how each chain fuses, or why not
    refuse_frozen_forwards(tree, plans)  # fx would freeze a forward that reads self.training
    apply_plans(tree, plans, kernel, report)
