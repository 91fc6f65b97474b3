"""Finding the fusable ``Conv2d -> ReLU -> MaxPool2d(2, 2)`` chains of a module tree, and how each can be fused.

Three steps, each a name of this module (``rewrite`` carries the plans out):

1. ``ModuleTree(root)``: who calls which module. Every module whose ``forward`` could call a ``Conv2d`` is traced
   with torch.fx, one module at a time (its children stay opaque ``call_module`` nodes); a stock
   ``nn.Sequential`` is read item by item; an untraceable forward is assumed to call any of its children.
2. ``find_chains(tree)``: every conv followed by a ReLU and/or a pool, in either order, with what is wrong with it
   (a pool that is not the kernels' 2x2 one, an intermediate result used elsewhere, ...).
3. ``plan(tree, chain)``: the cheapest way to fuse it that keeps the whole tree consistent (module swap,
   sequential slots, forward rewrite), or why it cannot be fused. The conv itself must pass the kernels' rule
   (``fastcnn.kernels.contract``, through ``fastcnn.nn.fusion_problem``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fastcnn.accelerate.report import ChainEntry, TraceFailure, label
from fastcnn.kernels.contract import pool_problem
from fastcnn.nn import ConvReLUPool2d, fusion_problem

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_RELU_FUNCTIONS = {F.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_"}
_RELU_METHODS = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}
_MAXPOOL_FUNCTIONS = {F.max_pool2d: "F.max_pool2d", torch.max_pool2d: "torch.max_pool2d"}
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAXPOOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}

MODULE_SWAP, SEQUENTIAL_SLOTS, FORWARD_REWRITE = "module swap", "sequential slots", "forward rewrite"


# ------------------------------------------------------------------------------------------------ tracing


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace(module: nn.Module) -> fx.Graph:
    """The fx graph of ``module``'s own forward, its children as opaque calls."""
    return _ChildrenAsLeaves().trace(module)


def node_input(node: fx.Node):
    """The tensor a call node is applied to (its first argument, however it was passed)."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


def is_stock_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, ConvReLUPool2d)


def _is_builtin(m: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(m, "") or isinstance(m, ConvReLUPool2d)


def _has_hooks(m: nn.Module) -> bool:
    return any(isinstance(v, dict) and v for k, v in vars(m).items() if k.endswith("hooks"))


def _overrides(m: nn.Module, base: type, *names: str) -> bool:
    return any(getattr(type(m), name) is not getattr(base, name) for name in names)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


# ------------------------------------------------------------------------------------------ 1. who calls what


@dataclasses.dataclass(eq=False)
class CallSite:
    """One place that calls a module: a traced forward's call_module node, a Sequential slot, or an untraced
    forward that may call any of its children."""

    kind: str  # "graph" | "slot" | "unknown"
    owner: nn.Module
    key: object  # the fx.Node, or the slot / child name


class ModuleTree:
    """A model's module tree as fusing sees it: each module's qualified name, every (parent, name) slot that holds
    it (so that a replacement lands at all of its names), every place that calls it, and the fx graph of every
    forward that was traced (with the tensor-constant attributes tracing attached to its module)."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.modules = [m for _, m in root.named_modules()]
        self.path = {id(m): name for name, m in root.named_modules()}
        self.slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for parent in self.modules:
            for name, child in parent._modules.items():
                if child is not None:
                    self.slots[id(child)].append((parent, name))
        self.sites: dict[int, list[CallSite]] = defaultdict(list)
        self.graphs: dict[int, fx.Graph] = {}
        self.trace_attrs: dict[int, tuple[nn.Module, set[str]]] = {}
        self.trace_failures: list[TraceFailure] = []
        for m in self.modules:
            self._read_calls(m)

    def _read_calls(self, m: nn.Module) -> None:
        children = [(name, child) for name, child in m._modules.items() if child is not None]
        if is_stock_sequential(m):
            for name, child in children:
                self.sites[id(child)].append(CallSite("slot", m, name))
            return
        if isinstance(m, _CONTAINERS) or not children:
            return  # no forward, or nothing it could call
        if not _is_builtin(m) and any(_is_conv(d) for d in m.modules() if d is not m):
            before = set(vars(m))
            try:
                graph = trace(m)
            except Exception as err:  # fx raises many kinds (TraceError, TypeError, NameError, ...)
                self.trace_failures.append(TraceFailure(self.path[id(m)], type(m).__name__, _one_line(err)))
            else:
                self.graphs[id(m)] = graph
                self.trace_attrs[id(m)] = (m, set(vars(m)) - before)
                for node in graph.nodes:
                    if node.op == "call_module":
                        self.sites[id(m.get_submodule(node.target))].append(CallSite("graph", m, node))
                return
        for name, child in children:  # a forward we do not read: assume it may call any of its children
            self.sites[id(child)].append(CallSite("unknown", m, name))

    def name(self, module: nn.Module) -> str:
        return self.path[id(module)]

    def site_of(self, module: nn.Module, owner: nn.Module, key) -> CallSite:
        return next(s for s in self.sites[id(module)] if s.owner is owner and (s.key is key or s.key == key))

    def describe_sites(self, sites: list[CallSite]) -> str:
        words = {"graph": "forward of", "slot": "items of", "unknown": "untraced forward of"}
        return "; ".join(f"{words[s.kind]} {label(self.name(s.owner))}" for s in sites)

    def entry(self, chain: Chain, reason: str) -> ChainEntry:
        """The report's row for ``chain``."""
        owner = f"{label(self.name(chain.owner))} ({type(chain.owner).__name__})"
        where = f"items of {owner}" if chain.kind == "slot" else f"forward of {owner}"
        node = f"slot {chain.nodes[0]}" if chain.kind == "slot" else chain.nodes[0].name
        return ChainEntry(self.name(chain.conv), node, where, " -> ".join(chain.labels), reason)


# ----------------------------------------------------------------------------------------------- 2. chains


@dataclasses.dataclass(eq=False)
class Chain:
    """A conv and the ReLU / pool steps after it, as written in one forward (``kind`` "graph") or one Sequential
    (``kind`` "slot"); ``problem`` is what keeps the steps from being the fused op's, or None."""

    conv: nn.Conv2d
    owner: nn.Module
    kind: str  # "graph" | "slot"
    labels: list[str]
    problem: str | None
    nodes: list = dataclasses.field(default_factory=list)  # fx nodes (graph) or slot names (slot)
    step_modules: list = dataclasses.field(default_factory=list)  # ReLU / pool module or None per step
    step_sites: list = dataclasses.field(default_factory=list)


def find_chains(tree: ModuleTree) -> list[Chain]:
    """Every conv of the tree followed by a ReLU or a pool, in the Sequentials and traced forwards that hold
    them."""
    chains = []
    for m in tree.modules:
        if is_stock_sequential(m):
            chains += _slot_chains(tree, m)
        elif id(m) in tree.graphs:
            chains += _graph_chains(tree, m, tree.graphs[id(m)])
    return chains


def _missing(kinds) -> str:
    return "a ReLU" if "pool" in kinds else "a 2x2 max pool"


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
        problem = pool_problem(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
        if problem:
            return problem
    if _has_hooks(m):
        return f"{name} module has hooks"
    return None


def _slot_chains(tree: ModuleTree, seq: nn.Sequential) -> list[Chain]:
    items = [(name, child) for name, child in seq._modules.items() if child is not None]
    chains = []
    for i, (name, conv) in enumerate(items):
        if not _is_conv(conv):
            continue
        chain = Chain(conv, seq, "slot", ["Conv2d"], None, [name])
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
            chain.step_sites.append(tree.site_of(step, seq, step_name))
            chain.problem = _module_step_problem(step, step_kind[0])
            if chain.problem:
                break
        else:
            if len(kinds) == 1:
                chain.problem = f"{chain.labels[-1]} ends the Sequential, no {_missing(kinds)} after it"
        if kinds:  # a conv followed by neither a ReLU nor a pool is not a chain at all
            chains.append(chain)
    return chains


def _node_step(owner: nn.Module, node: fx.Node) -> tuple[str, str, nn.Module | None] | None:
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


def _node_step_problem(node: fx.Node, kind: str, step_label: str, module: nn.Module | None,
                       prev: fx.Node) -> str | None:
    if module is not None:
        if node.kwargs.keys() - {"input"} or len(node.args) > 1 or node_input(node) is not prev:
            return f"{step_label} called with unexpected arguments"
        return _module_step_problem(module, kind)
    if kind == "relu":
        if node_input(node) is not prev:
            return f"{step_label} called with unexpected arguments"
        return None
    if node.target not in _MAXPOOL_FUNCTIONS:
        return f"{step_label} is not a 2x2 max pool"
    names = _MAXPOOL_ARGS if node.target is F.max_pool2d else _MAXPOOL_ARGS[:-1]
    if len(node.args) > len(names) or node.kwargs.keys() - set(names) \
            or set(names[:len(node.args)]) & node.kwargs.keys():
        return f"{step_label} called with unexpected arguments"
    bound = {**_MAXPOOL_DEFAULTS, **dict(zip(names, node.args, strict=False)), **node.kwargs}
    if bound.get("input") is not prev:
        return f"{step_label} called with unexpected arguments"
    values = [bound[name] for name in _MAXPOOL_ARGS[1:]]
    if any(isinstance(v, fx.Node) for v in values):
        return "max pool arguments are computed at run time"
    return pool_problem(*values)


def _graph_chains(tree: ModuleTree, owner: nn.Module, graph: fx.Graph) -> list[Chain]:
    chains = []
    for conv_node in graph.nodes:
        if conv_node.op != "call_module" or not _is_conv(conv := owner.get_submodule(conv_node.target)):
            continue
        chain = Chain(conv, owner, "graph", ["Conv2d"], None, [conv_node])
        prev, kinds = conv_node, set()
        for _ in range(2):
            users = list(prev.users)
            steps = [(u, _node_step(owner, u)) for u in users]
            matches = [(u, s) for u, s in steps if s and s[0] not in kinds]
            if not matches:
                if kinds:
                    after = ", ".join(u.name for u in users) or "nothing"
                    chain.problem = f"{chain.labels[-1]} output goes to {after}, not to {_missing(kinds)}"
                break
            node, (kind, step_label, module) = matches[0]
            chain.labels.append(step_label)
            chain.nodes.append(node)
            chain.step_modules.append(module)
            chain.step_sites.append(tree.site_of(module, owner, node) if module is not None else None)
            if len(users) > 1:
                others = ", ".join(u.name for u in users if u is not node)
                chain.problem = f"{chain.labels[-2]} output is also used by {others}"
            else:
                chain.problem = _node_step_problem(node, kind, step_label, module, prev)
            if chain.problem:
                break
            kinds.add(kind)
            prev = node
        if len(chain.labels) > 1:
            chains.append(chain)
    return chains


# ------------------------------------------------------------------------------------------------- 3. plans


@dataclasses.dataclass(eq=False)
class Plan:
    """How ``chain`` is fused (``strategy``: MODULE_SWAP, SEQUENTIAL_SLOTS or FORWARD_REWRITE), or why it is not
    (``problem``); exactly one of the two is set."""

    chain: Chain
    strategy: str | None
    problem: str | None = None


def conv_module_problem(conv: nn.Conv2d) -> str | None:
    """Why this conv module cannot become a ConvReLUPool2d in place, or None: the kernels' rule on its arguments,
    and what a module can add to a plain Conv2d (its own forward, hooks, parametrizations, more state)."""
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
    problem = fusion_problem(conv)
    return f"conv {problem}" if problem else None


def plan(tree: ModuleTree, chain: Chain) -> Plan:
    """The cheapest strategy that fuses ``chain`` and keeps every caller of its modules right, or why none does.

    - module swap: the conv, ReLU and pool modules are called by this chain only, so they can be replaced in the
      tree (the ReLU and pool by ``nn.Identity``);
    - sequential slots: inside a Sequential whose ReLU / pool objects also sit in other slots of it, only this
      chain's slots change;
    - forward rewrite: the chain is in a traced forward (functional calls, or modules shared by several chains),
      whose owner gets a forward without the ReLU and pool.
    """
    problem = conv_module_problem(chain.conv) or chain.problem
    if problem:
        return Plan(chain, None, problem)
    conv_sites = tree.sites[id(chain.conv)]
    if len(conv_sites) != 1:
        return Plan(chain, None, f"conv module is called from {len(conv_sites)} places "
                                 f"({tree.describe_sites(conv_sites)})")
    modules = chain.step_modules
    if all(m is not None for m in modules) and all(
            tree.sites[id(m)] == [site] for m, site in zip(modules, chain.step_sites, strict=True)):
        return Plan(chain, MODULE_SWAP)
    if chain.kind == "graph":
        return Plan(chain, FORWARD_REWRITE)
    shared = [m for m in modules if any(s.kind != "slot" for s in tree.sites[id(m)])]
    if not shared:
        return Plan(chain, SEQUENTIAL_SLOTS)
    m = shared[0]
    callers = tree.describe_sites([s for s in tree.sites[id(m)] if s.kind != "slot"])
    return Plan(chain, None, f"{type(m).__name__} module {tree.name(m)} is also called from {callers}")
