"""Recipes, repeated runs and the race (small data; the full-size figures are in the README)."""

import json
import statistics

import pytest

from fastcnn.cli import main
from fastcnn.config import TrainConfig, resolve
from fastcnn.errors import UsageError
from fastcnn.models import build_model
from fastcnn.race import format_race
from fastcnn.report import speedup_words
from fastcnn.runs import format_mean_std


def test_speedrun_recipe_resolution_and_overrides():
    rc = resolve(TrainConfig(recipe="speedrun", device="cpu"))
    assert (rc.model, rc.dataset, rc.batch_size, rc.opt, rc.schedule, rc.betas, rc.label_smoothing) == (
        "fastnet", "mnist", 256, "adam", "onecycle", (0.7, 0.9), 0.1)
    assert rc.amp is True and rc.channels_last and rc.loader == "device"  # the fast preset's, on the CPU too
    assert rc.mean == (0.1307,)
    custom = resolve(TrainConfig(recipe="speedrun", device="cpu", batch_size=128, amp=False, widths=(8, 8, 8)))
    assert (custom.batch_size, custom.amp, custom.widths) == (128, False, (8, 8, 8))
    fashion = resolve(TrainConfig(recipe="speedrun", dataset="fashion-mnist", device="cpu"))
    assert fashion.mean == (0.2860,) and fashion.epochs == 4  # one epoch of fastnet stays under 91% there
    public = resolve(TrainConfig(recipe="public", device="cpu"))
    assert (public.model, public.reference_model, public.amp, public.channels_last, public.loader) == (
        "mnistfast", True, False, False, "device")


def test_recipe_errors():
    with pytest.raises(UsageError, match="no settings for dataset"):
        resolve(TrainConfig(recipe="speedrun", dataset="synthetic", device="cpu"))
    with pytest.raises(UsageError, match="--widths applies to fastnet"):
        build_model("simplecnn", widths=(1, 2, 3))


def test_runs_write_means_and_a_speedrun_log(data_root, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--recipe", "speedrun", "--data-dir", str(data_root), "--train-subset", "2048",
                 "--test-subset", "500", "--runs", "2", "--target-acc", "15", "--eval-every", "2", "--widths",
                 "8,16,32", "--output", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == 2 and len(summary["per_run"]) == 2
    accs = [run["test_acc"] for run in summary["per_run"]]
    seconds = [run["train_seconds"] for run in summary["per_run"]]
    assert summary["test_acc"] == pytest.approx(statistics.fmean(accs))
    assert summary["test_acc_std"] == pytest.approx(statistics.stdev(accs))
    assert summary["train_seconds_std"] == pytest.approx(statistics.stdev(seconds))
    assert [run["seed"] for run in summary["per_run"]] == [0, 1]
    assert [len(run["evals"]) for run in summary["per_run"]] == [4, 4]  # after steps 2, 4, 6 of 8, and at the end
    assert summary["time_to_target"] is not None and summary["runs_reaching_target"] == 2
    assert (f"fastnet on mnist, 2 runs: test acc {format_mean_std(accs, 2, '%')} in "
            f"{format_mean_std(seconds, 3, ' s')} of training") in printed
    table = [line.split() for line in printed.splitlines() if line[:1] == " " or line[:1].isdigit()]
    assert [row[:2] for row in table if len(row) == 5] == [["1", "1"], ["2", "1"]]  # run, epoch: one row each
    assert (out / "run1" / "checkpoint.pt").exists() and (out / "run2" / "summary.json").exists()
    # the widths travel with the checkpoint: eval rebuilds the same network
    assert main(["eval", str(out / "run1" / "checkpoint.pt"), "--data-dir", str(data_root)]) == 0


def test_race_reports_both_recipes_and_their_ratio(data_root, tmp_path, capsys):
    json_path, png_path = tmp_path / "race.json", tmp_path / "race.png"
    code = main(["bench", "--race", "--data-dir", str(data_root), "--train-subset", "1024", "--test-subset", "300",
                 "--runs", "1", "--json", str(json_path), "--plot", str(png_path)])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(json_path.read_text())
    assert set(doc["contenders"]) == {"public", "speedrun"}
    public, speedrun = doc["contenders"]["public"], doc["contenders"]["speedrun"]
    assert doc["speedup"] == pytest.approx(public["train_seconds"] / speedrun["train_seconds"])
    assert public["model"] == "mnistfast" and speedrun["model"] == "fastnet"
    # 1024 images in batches of 256: 4 steps, evaluated after each of the first 3 and at the end
    assert len(public["per_run"][0]["evals"]) == len(speedrun["per_run"][0]["evals"]) == 4
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert (f"speedrun against the public recipe, mean training seconds: {speedup_words(doc['speedup'])}"
            in out.splitlines())
    assert public["test_acc_std"] == 0.0  # one run: the JSON keeps 0.0, the table shows no spread
    rows = table_rows(out)
    assert [row[4] for row in rows] == [row[6] for row in rows] == ["-", "-"]


def table_rows(printed):
    """The race table's two rows, split into cells (recipe, model, batch, acc, its std, seconds, their std)."""
    return [line.split() for line in printed.splitlines() if line.split()[:1] in (["public"], ["speedrun"])
            and len(line.split()) == 7]


def race_doc(runs, speedup):
    contender = dict(model="m", batch_size=256, test_acc=99.1, test_acc_std=0.05 if runs > 1 else 0.0,
                     train_seconds=1.5, train_seconds_std=0.125 if runs > 1 else 0.0)
    return dict(dataset="mnist", runs=runs, device_name="cpu", versions=dict(torch="2.x"), speedup=speedup,
                contenders=dict(public=dict(contender), speedrun=dict(contender)))


@pytest.mark.parametrize("runs, speedup, words, spreads", [
    (3, 2.4, "2.40x faster", ["0.05", "0.125"]),
    (2, 0.8, "0.80x: slower", ["0.05", "0.125"]),
    (1, 1.001, "1.00x: as fast", ["-", "-"]),
])
def test_the_race_words_its_ratio_and_shows_no_spread_for_one_run(runs, speedup, words, spreads):
    text = format_race(race_doc(runs, speedup))
    assert text.splitlines()[-1] == f"speedrun against the public recipe, mean training seconds: {words}"
    rows = table_rows(text)
    assert [[row[4], row[6]] for row in rows] == [spreads, spreads]
    assert ("1 run each" in text.splitlines()[0]) == (runs == 1)
