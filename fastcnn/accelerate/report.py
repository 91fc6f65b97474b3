"""What ``fastcnn.accelerate`` did to a model: the chains it fused and how, the chains it left and why, the
forwards torch.fx could not trace. ``str(report)`` is the table a user reads."""

from __future__ import annotations

import dataclasses

from torch import nn


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
    """What :func:`~fastcnn.accelerate.accelerate` did. ``str(report)`` is a table; ``verbose=True`` prints it."""

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
            lines.append(f"  tracing failed for {label(failure.module)} ({failure.class_name}): "
                         f"{failure.reason}; fell back to nn.Sequential items and traceable submodules")
        return "\n".join(lines)


def label(path: str) -> str:
    """A module's qualified name as the report shows it (the root has none)."""
    return path or "<root>"


def accelerate_report(model: nn.Module) -> AccelerateReport:
    """The :class:`AccelerateReport` of a model returned by ``fastcnn.accelerate`` (also once compiled).

    It prints nothing: ``print(accelerate_report(model))`` shows the table, once (``accelerate(..., verbose=True)``
    has already printed the same table when the model was accelerated).
    """
    for candidate in (model, getattr(model, "_orig_mod", None)):
        report = vars(candidate).get("fastcnn_report") if candidate is not None else None
        if isinstance(report, AccelerateReport):
            return report
    raise ValueError(f"{type(model).__name__} was not returned by fastcnn.accelerate() (no fastcnn_report)")
