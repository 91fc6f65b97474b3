"""Changing the model: a copy of the module tree that shares the original's tensors, and in it the planned
replacements (``match.plan``): fused convs, ``nn.Identity`` for swapped ReLU / pool modules and slots, and
generated subclasses whose ``forward`` is the traced graph without the fused ReLU and pool calls."""

from __future__ import annotations

import re
import types
from collections import defaultdict

import torch.fx as fx
from torch import nn

from fastcnn.accelerate.match import FORWARD_REWRITE, MODULE_SWAP, SEQUENTIAL_SLOTS, ModuleTree, Plan, node_input, trace
from fastcnn.accelerate.report import AccelerateReport
from fastcnn.nn import ConvReLUPool2d

# Module state that the copy shares with the original: the tensors themselves, so that both are one set of
# weights (an optimizer built on either trains both, `.to()` on either moves both).
_SHARED_STATE = ("_parameters", "_buffers", "_non_persistent_buffers_set")


def copy_tree(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of the module tree: new module objects (own children, hooks registries, training flag), the same
    parameter and buffer dicts. A module reachable by several paths stays one object in the copy."""
    memo = {} if memo is None else memo
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
        (name, None if child is None else copy_tree(child, memo)) for name, child in module._modules.items())
    if state.get("_compiled_call_impl") is not None:
        state["_compiled_call_impl"] = None  # bound to the original object; compile=True compiles the copy
    vars(copy).update(state)
    return copy


# ------------------------------------------------------------------------------------------- applying plans


def refuse_frozen_forwards(tree: ModuleTree, plans: list[Plan]) -> None:
    """Turn down the forward rewrites of every forward that fx cannot rewrite faithfully (``rewrite_problem``):
    all of that forward's chains stay as written."""
    by_owner: dict[int, list[Plan]] = defaultdict(list)
    for chosen in plans:
        if chosen.strategy == FORWARD_REWRITE:
            by_owner[id(chosen.chain.owner)].append(chosen)
    for owner_plans in by_owner.values():
        owner = owner_plans[0].chain.owner
        problem = rewrite_problem(owner, tree.graphs[id(owner)])
        if problem:
            for refused in owner_plans:
                refused.strategy, refused.problem = None, problem


def apply_plans(tree: ModuleTree, plans: list[Plan], kernel: str, report: AccelerateReport) -> None:
    """Fuse every chain that has a strategy, list every chain in ``report``, and take the tensor constants of
    traced forwards that were not rewritten off their modules again."""
    rewrites: dict[int, list[Plan]] = defaultdict(list)
    for chosen in plans:
        chain = chosen.chain
        if chosen.problem:
            report.skipped.append(tree.entry(chain, chosen.problem))
            continue
        _install(tree, chain.conv, ConvReLUPool2d.from_conv(chain.conv, kernel=kernel))
        if chosen.strategy == MODULE_SWAP:
            for m in chain.step_modules:
                _install(tree, m, nn.Identity())
        elif chosen.strategy == SEQUENTIAL_SLOTS:
            for name in chain.nodes[1:]:
                chain.owner._modules[name] = nn.Identity()
        elif chosen.strategy == FORWARD_REWRITE:
            rewrites[id(chain.owner)].append(chosen)
        report.fused.append(tree.entry(chain, chosen.strategy))
    for owner_plans in rewrites.values():
        owner = owner_plans[0].chain.owner
        _rewrite_forward(owner, tree.graphs[id(owner)], [chosen.chain.nodes for chosen in owner_plans])
        del tree.trace_attrs[id(owner)]  # the new forward reads them
    for module, attrs in tree.trace_attrs.values():
        for attr in attrs:
            delattr(module, attr)


def _install(tree: ModuleTree, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` in every slot of the tree that holds ``old``, in ``old``'s training mode."""
    new.train(old.training)
    for parent, name in tree.slots[id(old)]:
        parent._modules[name] = new


# ---------------------------------------------------------------------------------------- rewritten forwards


def rewrite_problem(owner: nn.Module, graph: fx.Graph) -> str | None:
    """Why ``owner``'s traced forward cannot replace its forward, or None: fx cannot re-emit structured inputs,
    and it freezes Python-level branches, so a forward that reads ``self.training`` would keep today's branch."""
    if type(graph._codegen) is not fx.graph.CodeGen:
        return f"forward of {type(owner).__name__} takes structured inputs fx cannot re-emit"
    before, mode = set(vars(owner)), owner.training
    try:
        owner.training = not mode
        other = trace(owner)
    except Exception:  # the other mode does not trace at all: it certainly differs
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


def _rewrite_forward(owner: nn.Module, graph: fx.Graph, chains: list[list[fx.Node]]) -> None:
    """Give ``owner`` a generated class whose forward is ``graph`` without the ReLU and pool of ``chains`` (each the
    conv node followed by its step nodes); a module rewritten before keeps its earlier fused convs."""
    cls = type(owner)
    base = getattr(cls, "_fastcnn_base", cls)
    targets = (*getattr(cls, "_fastcnn_fused", ()), *(nodes[0].target for nodes in chains))
    owner.__class__ = rewritten_class(base, targets)
    install_forward(owner, graph, [(nodes[0], nodes[1:]) for nodes in chains])


def rewritten_class(base: type, targets: tuple[str, ...]) -> type:
    """A subclass of ``base`` for one module whose forward is rewritten (``install_forward`` sets it).

    It pickles and deep-copies as (base class, fused conv names, state) and, when loaded, traces
    ``base.forward`` again and drops the same ReLU / pool calls, so ``torch.save(model)`` and
    ``copy.deepcopy`` work although the class itself cannot be imported."""

    def __reduce_ex__(self, protocol):
        return _new_rewritten, (base, targets), dict(vars(self))

    def __setstate__(self, state):
        base.__setstate__(self, state)
        graph = trace(self)  # the class has no forward of its own yet: this traces base.forward
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
        install_forward(self, graph, chains)

    namespace = {"__module__": base.__module__, "__doc__": base.__doc__, "__reduce_ex__": __reduce_ex__,
                 "__setstate__": __setstate__, "_fastcnn_base": base, "_fastcnn_fused": targets}
    return types.new_class(base.__name__, (base,), {}, lambda ns: ns.update(namespace))


def _new_rewritten(base: type, targets: tuple[str, ...]) -> nn.Module:
    cls = rewritten_class(base, targets)
    return cls.__new__(cls)


def install_forward(owner: nn.Module, graph: fx.Graph, chains: list[tuple[fx.Node, list[fx.Node]]]) -> None:
    """Drop each chain's ReLU and pool nodes (the fused conv now does them) and make the graph the forward of
    ``type(owner)``."""
    for conv_node, steps in chains:
        conv_node.args, conv_node.kwargs = (node_input(conv_node),), {}
        steps[-1].replace_all_uses_with(conv_node)
        for node in reversed(steps):
            graph.erase_node(node)
    graph.lint()
    generated = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    type(owner).forward = type(generated).forward
    type(owner).fastcnn_code = generated.code
