"""``fastcnn.accelerate(model)``: run every ``Conv2d -> ReLU -> MaxPool2d(2, 2)`` chain of a user's model as
one fused :class:`~fastcnn.nn.ConvReLUPool2d`, without changing a single weight or state_dict key.

How it finds the chains: every module of the model whose ``forward`` could call a ``Conv2d`` is traced with
``torch.fx``, one module at a time (its children stay opaque ``call_module`` nodes), and plain
``nn.Sequential`` containers are read item by item. A chain is fused in the cheapest way that keeps the whole
module tree consistent, whoever calls which submodule:

- *module swap*: conv, ReLU and pool are modules called only by this chain: the conv becomes the fused module
  and the ReLU and pool modules become ``nn.Identity``. No code changes; the model keeps its class.
- *sequential slots*: the same inside an ``nn.Sequential`` whose ReLU / pool module objects are shared by
  several of its slots: only this chain's slots become ``nn.Identity``.
- *forward rewrite*: the chain is written with functional calls (``F.relu``, ``torch.relu``, ``x.relu_()``,
  ``F.max_pool2d``, ...) or with ReLU / pool modules shared by several chains: the module that owns that
  ``forward`` gets a subclass of its own class whose ``forward`` is the fx graph without the ReLU and pool.

Anything else is left exactly as it was and listed, with the reason, in the report.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fastcnn import nn as fastcnn_nn
from fastcnn.nn import ConvReLUPool2d

__all__ = ["accelerate", "accelerate_report", "AccelerateReport", "ChainEntry", "TraceFailure"]

_KERNELS = getattr(fastcnn_nn, "KERNEL_CHOICES", ("auto", "triton", "torch"))
_MAX_KERNEL = 7
# Module state that the copy shares with the original: the tensors themselves, so that both are one set of
# weights (an optimizer built on either trains both, `.to()` on either moves both).
_SHARED_STATE = ("_parameters", "_buffers", "_non_persistent_buffers_set")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_RELU_FUNCTIONS = {F.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_"}
_RELU_METHODS = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}
_MAXPOOL_FUNCTIONS = {F.max_pool2d: "F.max_pool2d", torch.max_pool2d: "torch.max_pool2d"}
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAXPOOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}


# --------------------------------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class ChainEntry:
    """One chain found in the model.

    ``module``: qualified name of the conv (a state_dict prefix, e.g. ``"features.0"``); ``node``: the fx node
    of the conv call (``"conv1"``) or the Sequential slot (``"slot 0"``); ``where``: which forward holds the
    chain; ``pattern``: the chain as written (``"Conv2d -> F.relu -> F.max_pool2d"``); ``reason``: for a fused
    chain how it was fused, for a skipped one why not.
    """

    module: str
    node: str
    where: str
    pattern: str
    reason: str


@dataclasses.dataclass(frozen=True)
class TraceFailure:
    """A module whose ``forward`` torch.fx could not trace (its own chains stay unfused)."""

    module: str
    class_name: str
    reason: str


@dataclasses.dataclass
class AccelerateReport:
    """What :func:`accelerate` did. ``str(report)`` is a table; ``verbose=True`` prints it."""

    fused: list[ChainEntry] = dataclasses.field(default_factory=list)
    skipped: list[ChainEntry] = dataclasses.field(default_factory=list)
    trace_failures: list[TraceFailure] = dataclasses.field(default_factory=list)
    kernel: str = "auto"
    fuse: bool = True
    channels_last: bool = False
    compiled: bool = False

    @property
    def traced(self) -> bool:
        """True when torch.fx traced every module it needed to (no fallback was used)."""
        return not self.trace_failures

    def __str__(self) -> str:
        options = [f"kernel={self.kernel!r}"] + [name for name, on in (("channels_last", self.channels_last),
                                                                        ("compiled", self.compiled)) if on]
        head = (f"fastcnn.accelerate: {len(self.fused)} chain(s) fused, {len(self.skipped)} skipped "
                f"({', '.join(options)})")
        lines = [head]
        if not self.fuse:
            lines.append("  fusion off (fuse=False): no chain was looked for")
        rows = [("fused", e) for e in self.fused] + [("skipped", e) for e in self.skipped]
        if rows:
            table = [("status", "conv", "chain", "where", "how / why")]
            table += [(status, e.module, e.pattern, e.where, e.reason) for status, e in rows]
            widths = [max(len(row[i]) for row in table) for i in range(4)]
            for row in table:
                cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
                lines.append("  " + "  ".join([*cells, row[4]]))
        for failure in self.trace_failures:
            lines.append(f"  tracing failed for {_label(failure.module)} ({failure.class_name}): "
                         f"{failure.reason}; fell back to nn.Sequential items and traceable submodules")
        return "\n".join(lines)


def accelerate_report(model: nn.Module) -> AccelerateReport:
    """The :class:`AccelerateReport` of a model returned by :func:`accelerate` (also once compiled)."""
    for candidate in (model, getattr(model, "_orig_mod", None)):
        report = vars(candidate).get("fastcnn_report") if candidate is not None else None
        if isinstance(report, AccelerateReport):
            return report
    raise ValueError(f"{type(model).__name__} was not returned by fastcnn.accelerate() (no fastcnn_report)")


# ----------------------------------------------------------------------------------------------- public API


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
    - **What fuses.** A ``Conv2d`` module (stride 1, dilation 1, groups 1, square kernel <= 7, padding
      <= kernel // 2 with ``padding_mode="zeros"``, no hooks) whose output goes only to a ReLU
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
    - ``kernel`` (``"auto"`` | ``"triton"`` | ``"torch"``) is passed to every ``ConvReLUPool2d``.

    The report (:class:`AccelerateReport`) is the ``fastcnn_report`` attribute of the result, also returned by
    :func:`accelerate_report`; ``verbose=True`` prints it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate() expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError("accelerate() got a torch.compile'd module: pass the module itself and compile=True")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("accelerate() got a TorchScript module: pass the eager nn.Module")
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if not isinstance(compile, bool | dict):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")

    result = _copy_tree(model, {})
    report = AccelerateReport(kernel=kernel, fuse=fuse, channels_last=channels_last, compiled=bool(compile))
    if fuse:
        _Fuser(result, kernel, report).run()
    if channels_last:
        result.to(memory_format=torch.channels_last)
    result.fastcnn_report = report
    if compile:
        result.compile(**(compile if isinstance(compile, dict) else {}))
    if verbose:
        print(report)
    return result


# -------------------------------------------------------------------------------------------------- copying


def _copy_tree(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A copy of the module tree: new module objects (own children, hooks registries, training flag), the same
    parameter and buffer dicts. A module reachable by several paths stays one object in the copy."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    copy = cls.__new__(cls)
    memo[id(module)] = copy
    state = dict(vars(module))
    for key, value in state.items():
        if key not in _SHARED_STATE and isinstance(value, dict):
            state[key] = type(value)(value)  # _modules and the hook registries
    state["_modules"] = type(module._modules)(
        (name, None if child is None else _copy_tree(child, memo)) for name, child in module._modules.items())
    if state.get("_compiled_call_impl") is not None:
        state["_compiled_call_impl"] = None  # bound to the original object; compile=True compiles the copy
    vars(copy).update(state)
    return copy


# ------------------------------------------------------------------------------------------------- analysis


@dataclasses.dataclass(eq=False)
class _Site:
    """One place that calls a module: a traced forward's call_module node, a Sequential slot, or an untraced
    forward that may call any of its children."""

    kind: str  # "graph" | "slot" | "unknown"
    owner: nn.Module
    key: object  # the fx.Node, or the slot / child name


@dataclasses.dataclass(eq=False)
class _Chain:
    conv: nn.Conv2d
    owner: nn.Module
    kind: str  # "graph" | "slot"
    labels: list[str]
    problem: str | None
    nodes: list = dataclasses.field(default_factory=list)  # fx nodes (graph) or slot names (slot)
    step_modules: list = dataclasses.field(default_factory=list)  # ReLU / pool module or None per step
    step_sites: list = dataclasses.field(default_factory=list)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.Graph:
    return _ChildrenAsLeaves().trace(module)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _label(path: str) -> str:
    return path or "<root>"


def _is_stock_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, ConvReLUPool2d)


def _is_builtin(m: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(m, "") or isinstance(m, ConvReLUPool2d)


def _has_hooks(m: nn.Module) -> bool:
    return any(isinstance(v, dict) and v for k, v in vars(m).items() if k.endswith("hooks"))


def _overrides(m: nn.Module, base: type, *names: str) -> bool:
    return any(getattr(type(m), name) is not getattr(base, name) for name in names)


def _pair(value) -> tuple | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, tuple | list) and len(value) in (1, 2) and all(isinstance(v, int) for v in value):
        return (value[0], value[-1])
    return None


def _conv_problem(conv: nn.Conv2d) -> str | None:
    if _overrides(conv, nn.Conv2d, "forward", "_conv_forward"):
        return f"{type(conv).__name__} overrides Conv2d.forward"
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in conv.parameters(recurse=False)):
        return "lazy conv not initialized yet (run one forward first)"
    if parametrize.is_parametrized(conv):
        return "conv weight is parametrized"
    if _has_hooks(conv):
        return "conv has hooks (they would see the fused output)"
    if set(conv._parameters) != {"weight", "bias"} or conv._buffers or conv._modules:
        return "conv has extra parameters, buffers or submodules"
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square kernel {kh}x{kw}"
    if kh > _MAX_KERNEL:
        return f"kernel {kh}x{kw} larger than {_MAX_KERNEL}x{_MAX_KERNEL}"
    if tuple(conv.stride) != (1, 1):
        return f"conv stride {tuple(conv.stride)}, needs 1"
    if tuple(conv.dilation) != (1, 1):
        return f"conv dilation {tuple(conv.dilation)}, needs 1"
    if conv.groups != 1:
        return f"conv groups={conv.groups}, needs 1"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (string padding)"
    ph, pw = conv.padding
    if ph != pw:
        return f"asymmetric conv padding {(ph, pw)}"
    if ph > kh // 2:
        return f"conv padding {ph} larger than kernel_size // 2 = {kh // 2}"
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r}, needs 'zeros'"
    return None


def _pool_params_problem(kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> str | None:
    values = (kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if any(isinstance(v, fx.Node) for v in values):
        return "max pool arguments are computed at run time"
    if _pair(kernel_size) != (2, 2):
        return f"max pool kernel_size={kernel_size!r}, needs 2"
    default_stride = stride is None or (isinstance(stride, tuple | list) and len(stride) == 0)
    if not default_stride and _pair(stride) != (2, 2):
        return f"max pool stride={stride!r}, needs 2"
    if _pair(padding) != (0, 0):
        return f"max pool padding={padding!r}, needs 0"
    if _pair(dilation) != (1, 1):
        return f"max pool dilation={dilation!r}, needs 1"
    if ceil_mode:
        return "max pool ceil_mode=True"
    if return_indices:
        return "max pool return_indices=True"
    return None


def _module_step(m: nn.Module) -> tuple[str, str] | None:
    """('relu' | 'pool', label) for a ReLU or any pooling module, else None."""
    if isinstance(m, nn.ReLU):
        return "relu", type(m).__name__
    if type(m).__module__ == "torch.nn.modules.pooling" or isinstance(m, nn.MaxPool2d):
        return "pool", type(m).__name__
    return None


def _module_step_problem(m: nn.Module, kind: str) -> str | None:
    name = type(m).__name__
    if kind == "relu":
        if _overrides(m, nn.ReLU, "forward"):
            return f"{name} overrides ReLU.forward"
    else:
        if not isinstance(m, nn.MaxPool2d):
            return f"{name} is not a 2x2 max pool"
        if _overrides(m, nn.MaxPool2d, "forward"):
            return f"{name} overrides MaxPool2d.forward"
        problem = _pool_params_problem(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                       m.return_indices)
        if problem:
            return problem
    if _has_hooks(m):
        return f"{name} module has hooks"
    return None


def _missing(kinds) -> str:
    return "a ReLU" if "pool" in kinds else "a 2x2 max pool"


def _node_input(node: fx.Node):
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


class _Fuser:
    def __init__(self, root: nn.Module, kernel: str, report: AccelerateReport):
        self.root, self.kernel, self.report = root, kernel, report
        self.path = {id(m): name for name, m in root.named_modules()}
        # every (parent, name) that holds a module, so that a replacement lands at all of its qualified names
        self.slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for _, parent in root.named_modules():
            for name, child in parent._modules.items():
                if child is not None:
                    self.slots[id(child)].append((parent, name))
        self.sites: dict[int, list[_Site]] = defaultdict(list)
        self.graphs: dict[int, fx.Graph] = {}
        self.trace_attrs: dict[int, tuple[nn.Module, set[str]]] = {}  # tensor constants fx attached to it

    # --- collecting call sites and chains

    def run(self) -> None:
        modules = [m for _, m in self.root.named_modules()]
        for m in modules:
            self._collect_sites(m)
        chains = []
        for m in modules:
            if _is_stock_sequential(m):
                chains += self._slot_chains(m)
            elif id(m) in self.graphs:
                chains += self._graph_chains(m, self.graphs[id(m)])
        self._decide_and_apply(chains)

    def _collect_sites(self, m: nn.Module) -> None:
        children = [(name, child) for name, child in m._modules.items() if child is not None]
        if _is_stock_sequential(m):
            for name, child in children:
                self.sites[id(child)].append(_Site("slot", m, name))
            return
        if isinstance(m, _CONTAINERS) or not children:
            return  # no forward, or nothing it could call
        if not _is_builtin(m) and any(_is_conv(d) for d in m.modules() if d is not m):
            before = set(vars(m))
            try:
                graph = _trace(m)
            except Exception as err:  # fx raises many kinds (TraceError, TypeError, NameError, ...)
                failure = TraceFailure(self.path[id(m)], type(m).__name__, _one_line(err))
                self.report.trace_failures.append(failure)
            else:
                self.graphs[id(m)] = graph
                self.trace_attrs[id(m)] = (m, set(vars(m)) - before)
                for node in graph.nodes:
                    if node.op == "call_module":
                        self.sites[id(m.get_submodule(node.target))].append(_Site("graph", m, node))
                return
        for name, child in children:  # a forward we do not read: assume it may call any of its children
            self.sites[id(child)].append(_Site("unknown", m, name))

    def _slot_chains(self, seq: nn.Sequential) -> list[_Chain]:
        items = [(name, child) for name, child in seq._modules.items() if child is not None]
        chains = []
        for i, (name, conv) in enumerate(items):
            if not _is_conv(conv):
                continue
            chain = _Chain(conv, seq, "slot", ["Conv2d"], None, [name])
            kinds: list[str] = []
            for step_name, step in items[i + 1:i + 3]:
                step_kind = _module_step(step)
                if step_kind is None or step_kind[0] in kinds:
                    if kinds:
                        chain.problem = (f"{chain.labels[-1]} is followed by {type(step).__name__}, "
                                         f"not by {_missing(kinds)}")
                    break
                kinds.append(step_kind[0])
                chain.labels.append(step_kind[1])
                chain.nodes.append(step_name)
                chain.step_modules.append(step)
                chain.step_sites.append(self._site_of(step, seq, step_name))
                chain.problem = _module_step_problem(step, step_kind[0])
                if chain.problem:
                    break
            else:
                if len(kinds) == 1:
                    chain.problem = f"{chain.labels[-1]} ends the Sequential, no {_missing(kinds)} after it"
            if kinds:  # a conv followed by neither a ReLU nor a pool is not a chain at all
                chains.append(chain)
        return chains

    def _site_of(self, module: nn.Module, owner: nn.Module, key) -> _Site:
        return next(s for s in self.sites[id(module)] if s.owner is owner and (s.key is key or s.key == key))

    def _node_step(self, owner: nn.Module, node: fx.Node) -> tuple[str, str, nn.Module | None] | None:
        """('relu' | 'pool', label, module or None) for a ReLU or pooling call, else None."""
        if node.op == "call_module":
            m = owner.get_submodule(node.target)
            step = _module_step(m)
            return (*step, m) if step else None
        if node.op == "call_function":
            if node.target in _RELU_FUNCTIONS:
                return "relu", _RELU_FUNCTIONS[node.target], None
            if node.target in _MAXPOOL_FUNCTIONS:
                return "pool", _MAXPOOL_FUNCTIONS[node.target], None
            name = getattr(node.target, "__name__", "")
            if "pool" in name:
                return "pool", name, None
        if node.op == "call_method":
            if node.target in _RELU_METHODS:
                return "relu", _RELU_METHODS[node.target], None
            if "pool" in node.target:
                return "pool", f"Tensor.{node.target}", None
        return None

    def _node_step_problem(self, node: fx.Node, kind: str, label: str, module: nn.Module | None,
                           prev: fx.Node) -> str | None:
        if module is not None:
            if node.kwargs.keys() - {"input"} or len(node.args) > 1 or _node_input(node) is not prev:
                return f"{label} called with unexpected arguments"
            return _module_step_problem(module, kind)
        if kind == "relu":
            if _node_input(node) is not prev:
                return f"{label} called with unexpected arguments"
            return None
        if node.target not in _MAXPOOL_FUNCTIONS:
            return f"{label} is not a 2x2 max pool"
        names = _MAXPOOL_ARGS if node.target is F.max_pool2d else _MAXPOOL_ARGS[:-1]
        if len(node.args) > len(names) or node.kwargs.keys() - set(names) \
                or set(names[:len(node.args)]) & node.kwargs.keys():
            return f"{label} called with unexpected arguments"
        bound = {**_MAXPOOL_DEFAULTS, **dict(zip(names, node.args, strict=False)), **node.kwargs}
        if bound.get("input") is not prev:
            return f"{label} called with unexpected arguments"
        return _pool_params_problem(*(bound[name] for name in _MAXPOOL_ARGS[1:]))

    def _graph_chains(self, owner: nn.Module, graph: fx.Graph) -> list[_Chain]:
        chains = []
        for conv_node in graph.nodes:
            if conv_node.op != "call_module" or not _is_conv(conv := owner.get_submodule(conv_node.target)):
                continue
            chain = _Chain(conv, owner, "graph", ["Conv2d"], None, [conv_node])
            prev, kinds = conv_node, set()
            for _ in range(2):
                users = list(prev.users)
                steps = [(u, self._node_step(owner, u)) for u in users]
                matches = [(u, s) for u, s in steps if s and s[0] not in kinds]
                if not matches:
                    if kinds:
                        after = ", ".join(u.name for u in users) or "nothing"
                        chain.problem = f"{chain.labels[-1]} output goes to {after}, not to {_missing(kinds)}"
                    break
                node, (kind, label, module) = matches[0]
                chain.labels.append(label)
                chain.nodes.append(node)
                chain.step_modules.append(module)
                chain.step_sites.append(self._site_of(module, owner, node) if module is not None else None)
                if len(users) > 1:
                    others = ", ".join(u.name for u in users if u is not node)
                    chain.problem = f"{chain.labels[-2]} output is also used by {others}"
                else:
                    chain.problem = self._node_step_problem(node, kind, label, module, prev)
                if chain.problem:
                    break
                kinds.add(kind)
                prev = node
            if len(chain.labels) > 1:
                chains.append(chain)
        return chains

    # --- deciding and rewriting

    def _where(self, chain: _Chain) -> str:
        owner = f"{_label(self.path[id(chain.owner)])} ({type(chain.owner).__name__})"
        if chain.kind == "slot":
            return f"items of {owner}"
        return f"forward of {owner}"

    def _node_name(self, chain: _Chain) -> str:
        return f"slot {chain.nodes[0]}" if chain.kind == "slot" else chain.nodes[0].name

    def _describe_sites(self, sites: list[_Site]) -> str:
        words = {"graph": "forward of", "slot": "items of", "unknown": "untraced forward of"}
        return "; ".join(f"{words[s.kind]} {_label(self.path[id(s.owner)])}" for s in sites)

    def _entry(self, chain: _Chain, reason: str) -> ChainEntry:
        return ChainEntry(self.path[id(chain.conv)], self._node_name(chain), self._where(chain),
                          " -> ".join(chain.labels), reason)

    def _strategy(self, chain: _Chain) -> tuple[str | None, str | None]:
        """(strategy, None) or (None, why not)."""
        problem = _conv_problem(chain.conv) or chain.problem
        if problem:
            return None, problem
        conv_sites = self.sites[id(chain.conv)]
        if len(conv_sites) != 1:
            where = self._describe_sites(conv_sites)
            return None, f"conv module is called from {len(conv_sites)} places ({where})"
        modules = chain.step_modules
        if all(m is not None for m in modules) and all(
                self.sites[id(m)] == [site] for m, site in zip(modules, chain.step_sites, strict=True)):
            return "module swap", None
        if chain.kind == "graph":
            return "forward rewrite", None
        shared = [m for m in modules if any(s.kind != "slot" for s in self.sites[id(m)])]
        if not shared:
            return "sequential slots", None
        m = shared[0]
        return None, (f"{type(m).__name__} module {self.path[id(m)]} is also called from "
                      f"{self._describe_sites([s for s in self.sites[id(m)] if s.kind != 'slot'])}")

    def _decide_and_apply(self, chains: list[_Chain]) -> None:
        decided = [(chain, *self._strategy(chain)) for chain in chains]
        rewrites: dict[int, list[_Chain]] = defaultdict(list)
        for chain, strategy, _ in decided:
            if strategy == "forward rewrite":
                rewrites[id(chain.owner)].append(chain)
        refused = {}
        for owner_chains in rewrites.values():
            why_not = self._rewrite_problem(owner_chains[0].owner)
            for chain in owner_chains:
                refused[id(chain)] = why_not
        for chain, strategy, problem in decided:
            problem = problem or refused.get(id(chain))
            if problem:
                self.report.skipped.append(self._entry(chain, problem))
                continue
            self._install(chain.conv, ConvReLUPool2d.from_conv(chain.conv, kernel=self.kernel))
            if strategy == "module swap":
                for m in chain.step_modules:
                    self._install(m, nn.Identity())
            elif strategy == "sequential slots":
                for name in chain.nodes[1:]:
                    chain.owner._modules[name] = nn.Identity()
            self.report.fused.append(self._entry(chain, strategy))
        for owner_chains in rewrites.values():
            accepted = [c for c in owner_chains if refused[id(c)] is None]
            if accepted:
                owner = accepted[0].owner
                self._rewrite_forward(owner, self.graphs[id(owner)], accepted)
                del self.trace_attrs[id(owner)]  # the new forward reads them
        for module, attrs in self.trace_attrs.values():
            for attr in attrs:
                delattr(module, attr)

    def _install(self, old: nn.Module, new: nn.Module) -> None:
        new.train(old.training)
        for parent, name in self.slots[id(old)]:
            parent._modules[name] = new

    def _rewrite_problem(self, owner: nn.Module) -> str | None:
        graph = self.graphs[id(owner)]
        if type(graph._codegen) is not fx.graph.CodeGen:
            return f"forward of {type(owner).__name__} takes structured inputs fx cannot re-emit"
        # fx freezes Python-level branches: a forward that reads self.training would keep today's branch.
        before, mode = set(vars(owner)), owner.training
        try:
            owner.training = not mode
            other = _trace(owner)
        except Exception:
            other = None
        finally:
            owner.training = mode
            for attr in set(vars(owner)) - before:  # tensor constants that the second trace attached
                delattr(owner, attr)

        def code(g):
            return re.sub(r"_tensor_constant\d+", "_tensor_constant", g.python_code("self").src)

        if other is None or code(other) != code(graph):
            return f"forward of {type(owner).__name__} depends on self.training (fx would freeze one branch)"
        return None

    def _rewrite_forward(self, owner: nn.Module, graph: fx.Graph, chains: list[_Chain]) -> None:
        cls = type(owner)
        base = getattr(cls, "_fastcnn_base", cls)
        targets = (*getattr(cls, "_fastcnn_fused", ()), *(chain.nodes[0].target for chain in chains))
        owner.__class__ = _rewritten_class(base, targets)
        _install_forward(owner, graph, [(chain.nodes[0], chain.nodes[1:]) for chain in chains])


# ---------------------------------------------------------------------------------------- rewritten forwards


def _rewritten_class(base: type, targets: tuple[str, ...]) -> type:
    """A subclass of ``base`` for one module whose forward is rewritten (``_install_forward`` sets it).

    It pickles and deep-copies as (base class, fused conv names, state) and, when loaded, traces
    ``base.forward`` again and drops the same ReLU / pool calls, so ``torch.save(model)`` and
    ``copy.deepcopy`` work although the class itself cannot be imported."""

    def __reduce_ex__(self, protocol):
        return _new_rewritten, (base, targets), dict(vars(self))

    def __setstate__(self, state):
        base.__setstate__(self, state)
        graph = _trace(self)  # the class has no forward of its own yet: this traces base.forward
        chains = []
        for node in graph.nodes:
            if node.op == "call_module" and node.target in targets:
                steps, prev = [], node
                for _ in range(2):
                    users = list(prev.users)
                    if len(users) != 1:
                        raise RuntimeError(f"{base.__qualname__}.forward no longer applies ReLU and max pool "
                                           f"to {node.target} as it did when fastcnn.accelerate rewrote it")
                    prev = users[0]
                    steps.append(prev)
                chains.append((node, steps))
        _install_forward(self, graph, chains)

    namespace = {"__module__": base.__module__, "__doc__": base.__doc__, "__reduce_ex__": __reduce_ex__,
                 "__setstate__": __setstate__, "_fastcnn_base": base, "_fastcnn_fused": targets}
    return types.new_class(base.__name__, (base,), {}, lambda ns: ns.update(namespace))


def _new_rewritten(base: type, targets: tuple[str, ...]) -> nn.Module:
    cls = _rewritten_class(base, targets)
    return cls.__new__(cls)


def _install_forward(owner: nn.Module, graph: fx.Graph, chains: list[tuple[fx.Node, list[fx.Node]]]) -> None:
    """Drop each chain's ReLU and pool nodes (the fused conv now does them) and make the graph the forward of
    ``type(owner)``."""
    for conv_node, steps in chains:
        conv_node.args, conv_node.kwargs = (_node_input(conv_node),), {}
        steps[-1].replace_all_uses_with(conv_node)
        for node in reversed(steps):
            graph.erase_node(node)
    graph.lint()
    generated = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    type(owner).forward = type(generated).forward
    type(owner).fastcnn_code = generated.code
