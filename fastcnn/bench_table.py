"""How a ``fastcnn bench`` results document is shown: the printed table (median, spread, ratios in words), its
foot (profiles, what was skipped or failed, an interruption), and the bar chart."""

from __future__ import annotations

import pathlib

from fastcnn.checkpoint import atomic_write_bytes
from fastcnn.profiling import format_profile
from fastcnn.report import format_table, speedup_words, spread

# A configuration the interrupted run never reached: recorded as its "failed" reason in the JSON, shown as part of
# the one line that says what was measured.
NOT_MEASURED = "not measured: the run was interrupted first"


def format_results(doc: dict) -> str:
    epoch = doc["mode"] == "epoch"
    measured = [row for row in doc["results"] if "images_per_second" in row]
    shown = [_displayed(row, epoch, doc["repeats"]) for row in measured]
    columns = [("config", "config", "s"), ("images_per_second", "images/s", ",.0f"), ("ms_per_step", "ms/step", ".3f")]
    if epoch:
        columns += [("epoch_seconds", "epoch s", ".2f")]
        if any(row.get("epoch_spread") for row in shown):
            columns += [("epoch_spread", "min-max s", "s")]
        columns += [("test_acc", "test acc", ".2f")]
    elif any(row.get("ms_spread") for row in shown):
        columns += [("ms_spread", "p20-p80 ms", "s")]
    if len(measured) > 1:  # one line alone has nothing to be compared with
        columns += [("vs_first", f"vs {doc['baseline']}", "s")]
    if any(row.get("vs_previous") for row in shown):  # only along an ablation: a column of dashes says nothing
        columns += [("vs_previous", "vs previous", "s")]
    if any(row.get("peak_memory_mb") is not None for row in measured):  # a CPU has no device peak to report
        columns += [("peak_memory_mb", "peak MiB", ".1f"), ("step_memory_mb", "step MiB", ".1f")]
    lines = [_headline(doc), ""]
    lines.append(format_table(shown, columns) if measured else "(nothing measured)")
    lines += [format_profile(row["config"], row["profile"]) for row in measured if "profile" in row]
    lines += [f"profile {row['config']} failed: {row['profile_error']}" for row in measured if "profile_error" in row]
    lines += _skipped_lines(doc["results"])
    lines += [f"failed {row['config']}: {row['failed']}" for row in doc["results"]
              if "failed" in row and row["failed"] != NOT_MEASURED]
    if doc.get("interrupted"):
        lines.append(interruption_line(doc))
    return "\n".join(lines)


def _headline(doc: dict) -> str:
    if doc["mode"] == "epoch":
        rounds = doc["rounds_completed"]
        how = f"median of {rounds} interleaved round(s)" + ("; min-max: over the rounds" if rounds > 1 else "")
    else:
        how = f"median of {doc['repeats']} x {doc['steps']} steps after {doc['warmup']} warm-up"
        how += "; p20-p80: the spread of the repeats" if doc["repeats"] > 1 else " (one repeat: no spread)"
    return (f"{doc['model']} on {doc['dataset']}, batch {doc['batch_size']}, {doc['device_name']}, torch "
            f"{doc['versions']['torch']}; {how}")


def _displayed(row: dict, epoch: bool, repeats: int) -> dict:
    """The row with its spread and ratios as the table's text cells (one run has no spread: "-", never 0)."""
    shown = dict(row, vs_first=_ratio_cell(row, "speedup_vs_first"),
                 vs_previous=_ratio_cell(row, "speedup_vs_previous"))
    if epoch:
        seconds = row.get("epoch_seconds_all") or []
        shown["epoch_spread"] = spread(min(seconds), max(seconds), ".2f") if len(seconds) > 1 else None
    elif repeats > 1:
        shown["ms_spread"] = spread(row.get("ms_per_step_p20"), row.get("ms_per_step_p80"), ".3f")
    return shown


def _ratio_cell(row: dict, key: str) -> str | None:
    ratio = row.get(key)
    if ratio is None:
        return None
    if key == "speedup_vs_first" and ratio == 1.0:
        return "1.00x"  # the baseline itself (or one exactly as fast): nothing to word
    return speedup_words(ratio)


def _skipped_lines(rows: list[dict]) -> list[str]:
    """One line per reason: configurations skipped for the same reason share it."""
    by_reason: dict[str, list[str]] = {}
    for row in rows:
        if "skipped" in row:
            by_reason.setdefault(row["skipped"], []).append(row["config"])
    return [f"skipped {', '.join(names)}: {reason}" for reason, names in by_reason.items()]


def interruption_line(doc: dict) -> str:
    """The one line an interrupted bench says: by what, what it measured, what it did not reach."""
    rows = doc["results"]
    measured = [row["config"] for row in rows if "images_per_second" in row]
    missing = [row["config"] for row in rows if row.get("failed") == NOT_MEASURED]
    by = f" by {doc['interrupted_by']}" if doc.get("interrupted_by") else ""
    rounds = (f" after {doc['rounds_completed']} of {doc['repeats']} round(s)"
              if doc["mode"] == "epoch" and doc["repeats"] > 1 else "")
    line = f"INTERRUPTED{by}{rounds}: measured {', '.join(measured) or 'nothing'}"
    return line + (f"; not measured: {', '.join(missing)}" if missing else "")


def plot_results(path: pathlib.Path, doc: dict) -> None:
    """Images per second per configuration, with the spread of the repeats as whiskers where there is one."""
    import matplotlib  # optional dependency, and slow to import: only a bench asked for a chart pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in doc["results"] if "images_per_second" in row][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(measured) + 1.5))
    names = [row["config"] for row in measured]
    rates = [row["images_per_second"] for row in measured]
    low = [rate - row.get("images_per_second_p20", rate) for rate, row in zip(rates, measured, strict=True)]
    high = [row.get("images_per_second_p80", rate) - rate for rate, row in zip(rates, measured, strict=True)]
    bars = ax.barh(names, rates, color="tab:blue", xerr=[low, high] if any(low + high) else None, capsize=3)
    for bar, row in zip(bars, measured, strict=True):
        words = _ratio_cell(row, "speedup_vs_first")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {words}", va="center", fontsize=8)
    ax.set_xlabel(f"training images / s (higher is better); text: against {doc['baseline']}")
    ax.set_title(f"{doc['model']}, batch {doc['batch_size']}, {doc['device_name']}", fontsize=9)
    ax.set_xlim(0, max(rates) * 1.35 if rates else 1)
    fig.tight_layout()
    atomic_write_bytes(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)
