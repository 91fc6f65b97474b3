"""fastcnn.report: the wording of speed ratios, spreads, tables, and curves readable at 1 epoch and at 50."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fastcnn.report import curves_figure, format_table, plot_curves, speedup_words, spread  # noqa: E402


@pytest.mark.parametrize(("ratio", "words"), [(2.4, "2.40x faster"), (0.8, "0.80x: slower"), (0.56, "0.56x: slower"),
                                              (1.001, "1.00x: as fast"), (0.999, "1.00x: as fast"), (None, None)])
def test_a_speed_ratio_says_faster_or_slower(ratio, words):
    assert speedup_words(ratio) == words


def test_spread_is_low_high_or_nothing():
    assert spread(1.2345, 2.5, ".2f") == "1.23-2.50"
    assert spread(None, 2.0, ".2f") is None and spread(1.0, None, ".2f") is None


def test_format_table_aligns_and_shows_missing_values_as_a_dash():
    text = format_table([dict(name="a", value=1.5), dict(name="longer", value=None)],
                        [("name", "name", "s"), ("value", "value", ".2f")])
    header, rule, first, second = text.splitlines()
    assert len({len(header), len(rule), len(first), len(second)}) == 1
    assert first.split() == ["a", "1.50"] and second.split() == ["longer", "-"]


def _history(epochs):
    return [dict(epoch=e, train_loss=1 / e, train_acc=90 + e / 10, test_loss=1.1 / e, test_acc=89 + e / 10,
                 epoch_seconds=1.0, images_per_second=1000.0) for e in range(1, epochs + 1)]


def _tick_labels(ax):
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


def test_one_epoch_with_step_losses_is_a_curve_not_a_dot():
    step_losses = [dict(epoch=(i + 1) / 20, train_loss=2.3 / (i + 1)) for i in range(20)]
    fig = curves_figure(_history(1), "one epoch", step_losses=step_losses)
    loss_ax, acc_ax = fig.axes
    train_line = loss_ax.get_lines()[0]
    assert len(train_line.get_xdata()) == 20
    ticks = _tick_labels(loss_ax)
    assert len(ticks) >= 3 and any(tick != int(tick) for tick in ticks)  # where in the epoch, not only "1"
    plt.close(fig)


def test_without_step_losses_the_curves_have_one_point_per_epoch():
    fig = curves_figure(_history(3), "three epochs")
    loss_ax, _ = fig.axes
    assert [len(line.get_xdata()) for line in loss_ax.get_lines()] == [3, 3]
    assert _tick_labels(loss_ax) == [1, 2, 3]
    plt.close(fig)


def test_test_curves_follow_evaluations_within_epochs_when_given():
    evals = [dict(epoch=e / 4, train_seconds=e, test_loss=1 / e, test_acc=90 + e) for e in range(1, 9)]
    fig = curves_figure(_history(2), "two epochs", evals=evals)
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.get_lines()[1].get_xdata()) == 8 and len(acc_ax.get_lines()[1].get_xdata()) == 8
    plt.close(fig)


@pytest.mark.parametrize("epochs", [30, 50])
def test_many_epochs_get_a_few_whole_epoch_ticks(epochs):
    fig = curves_figure(_history(epochs), f"{epochs} epochs")
    for ax in fig.axes:
        ticks = _tick_labels(ax)
        assert 2 <= len(ticks) <= 11 and all(tick == int(tick) for tick in ticks), ticks
        assert all(len(line.get_xdata()) == epochs for line in ax.get_lines())
    plt.close(fig)


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "curves.png"
    plot_curves(path, _history(1), "one epoch", step_losses=[dict(epoch=0.5, train_loss=1.0),
                                                            dict(epoch=1.0, train_loss=0.5)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
