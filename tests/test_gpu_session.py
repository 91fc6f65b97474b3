"""bench/gpu_session.sh is run on a short GPU lease, where a broken script wastes device time: run its lease here,
on a CPU, end to end, the way the GPU machine gets it (a copy of the tree without .git, MNIST's .gz files under
.gpu/data, the commit in .gpu/commit), and check its verdicts, packing, budget cut and second command."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GPU_PACK = REPO.parent / "shared" / "tools" / "gpu-pack.sh"
LEASE = ["install", "env", "cuda-kernel-tests", "cuda-graph-tests", "epoch-b64", "epoch-b512", "epoch-cudnn-b64",
         "kernel-cell", "epoch-ablation-b64", "profile-fast-b64"]
LEASE2_OWN = ["cuda-tests-more", "kernels-all"]
CUDA_ONLY = {"cuda-kernel-tests", "cuda-graph-tests", "kernel-cell", "cuda-tests-more", "kernels-all"}
ON_CPU = ["install", "env", "epoch-b64", "epoch-b512", "epoch-cudnn-b64", "profile-fast-b64"]
COMMIT = "0123456789abcdef0123456789abcdef01234567-dirty"


def copy_tree(destination: pathlib.Path) -> None:
    """The files the device tool sends: tracked and untracked-not-ignored ones, no .git."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".gpu", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "build", "*.so"))
        return
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def make_venv(path: pathlib.Path) -> pathlib.Path:
    """A venv that sees this interpreter's packages (torch, pip, setuptools) but installs fastcnn on its own, so
    that the script's install stage leaves this environment and the real checkout alone."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (pathlib.Path(site) / "fastcnn-test-base.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("checkout")
    copy_tree(root)
    raw = root / ".gpu" / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in sorted((data_root / "MNIST" / "raw").glob("*.gz")):
        shutil.copy(gz, raw / gz.name)
    if len(list(raw.glob("*.gz"))) != 4:
        pytest.skip(f"MNIST's four .gz files not found under {data_root}/MNIST/raw")
    (root / ".gpu" / "commit").write_text(COMMIT + "\n")
    return dict(root=root, python=make_venv(tmp_path_factory.mktemp("venv") / "venv"))


def run(checkout, out, *stages, budget=None, state=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCNN_DATA", "GIT_DIR", "GPU_SESSION_BUDGET")}
    env.update(OUT=str(out), PYTHON=str(checkout["python"]), GPU_SESSION_STATE=str(state or out / "state"))
    if budget is not None:
        env["GPU_SESSION_BUDGET"] = str(budget)
    result = subprocess.run(["bash", str(checkout["root"] / "bench" / "gpu_session.sh"), *stages],
                            capture_output=True, text=True, env=env, timeout=timeout)
    return result


def verdicts(out: pathlib.Path) -> dict[str, str]:
    """Stage name -> its line in stages.txt, read from the archive that came back."""
    with tarfile.open(out / "gpu-results.tar.gz") as archive:
        text = archive.extractfile("gpu-results/stages.txt").read().decode()
    lines = [line.split(" ", 1) for line in text.splitlines()]
    return {name: rest for name, rest in lines}


def archived_json(out: pathlib.Path, name: str) -> dict:
    with tarfile.open(out / "gpu-results.tar.gz") as archive:
        return json.load(archive.extractfile(f"gpu-results/{name}"))


@pytest.fixture(scope="module")
def lease(checkout, tmp_path_factory):
    out = tmp_path_factory.mktemp("lease")
    # A budget no CPU run reaches: this run checks what each stage records, not how fast this machine is (a
    # 120 s budget, 71 s used here, cut the last stage on a slower CI machine). The budget cut has its own test.
    result = run(checkout, out, "lease", budget=1200, state=out / "state", timeout=1500)
    return dict(out=out, state=out / "state", result=result)


def test_lease_records_every_stage_with_its_exit_status_or_skip_reason(lease):
    result, out = lease["result"], lease["out"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = verdicts(out)
    assert list(found) == LEASE
    for name in ON_CPU:
        assert found[name].startswith("exit=0 "), (name, found[name])
    for name in CUDA_ONLY & set(LEASE):
        assert found[name].startswith("skipped=no-cuda ("), (name, found[name])
    assert found["epoch-ablation-b64"].startswith("skipped=cpu (")
    log = (out / "gpu-session.log").read_text()
    assert "stage kernel-cell: skipped, no CUDA GPU here" in log
    assert "unpacked 4 files under .gpu/data" in log and "removed the 4 files unpacked" in log
    assert not list((pathlib.Path(archived_json(out, "gpu-cpu-session.json")["data"]) / "MNIST" / "raw").glob(
        "*-ubyte")), "unpacked MNIST left under .gpu/data would not fit the 64 MiB a command carries"


def test_lease_results_carry_command_device_versions_and_commit(lease):
    out = lease["out"]
    session = archived_json(out, "gpu-cpu-session.json")
    assert session["command"] == "bash bench/gpu_session.sh lease" and session["device"] == "cpu"
    assert session["git_commit"] == COMMIT  # the copy has no .git: the commit comes from .gpu/commit
    assert session["versions"]["torch"] and session["device_name"].startswith("CPU")
    assert [stage["stage"] for stage in session["stages"]] == LEASE
    assert json.loads((out / "gpu-cpu-session.json").read_text())["stages"] == session["stages"]
    for name in ("epoch-b64", "epoch-b512", "epoch-cudnn-b64", "profile-fast-b64"):
        doc = archived_json(out, f"gpu-cpu-{name}.json")
        assert doc["git_commit"] == COMMIT and doc["device"] == "cpu" and doc["versions"]["torch"]
        assert doc["command"].startswith("fastcnn bench ") and "--train-subset 2048" in doc["command"]
        assert all("test_acc" in row for row in doc["results"]) or name == "profile-fast-b64"
    assert [row["config"] for row in archived_json(out, "gpu-cpu-epoch-b64.json")["results"]] == ["reference", "fast"]
    env = archived_json(out, "gpu-cpu-env.json")
    assert env["fastcnn_session"]["git_commit"] == COMMIT and env["versions"]["fastcnn"]


def test_lease2_after_lease_reruns_nothing_lease_finished(lease, checkout, tmp_path):
    result = run(checkout, tmp_path, "lease2", budget=1200, state=lease["state"], timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = verdicts(tmp_path)
    assert list(found) == ["install", "env"] + LEASE[2:] + LEASE2_OWN
    assert all(found[name] == "skipped=done-earlier" for name in LEASE[2:])
    assert all(found[name].startswith("skipped=no-cuda") for name in LEASE2_OWN)


def test_a_spent_budget_skips_the_later_stages_and_lease2_plans_them_again(checkout, tmp_path):
    # 50 s: at most the install (its limit cut to what is left) and env fit; the epoch stages cannot.
    result = run(checkout, tmp_path / "lease", "lease", budget=50, state=tmp_path / "state")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = verdicts(tmp_path / "lease")
    assert list(found) == LEASE
    cut = [name for name in LEASE if found[name] == "skipped=budget"]
    assert {"epoch-b64", "epoch-b512", "epoch-cudnn-b64", "profile-fast-b64"} <= set(cut)
    assert cut == [name for name in LEASE if name not in CUDA_ONLY | {"epoch-ablation-b64"}][-len(cut):]
    assert (tmp_path / "lease" / "gpu-results.tar.gz").exists()
    if "install" not in cut:
        limit = int(result.stdout.split("stage install (limit ")[1].split("s)")[0])
        assert limit <= 50 - 25

    # What the budget cut is lease2's to do (here its own budget is spent too, so it skips them again).
    result = run(checkout, tmp_path / "lease2", "lease2", budget=30, state=tmp_path / "state")
    assert result.returncode == 0
    again = verdicts(tmp_path / "lease2")
    assert {"epoch-b64", "epoch-b512", "epoch-cudnn-b64", "profile-fast-b64"} <= {
        name for name, verdict in again.items() if verdict == "skipped=budget"}
    assert again["cuda-kernel-tests"] == "skipped=done-earlier"


def test_a_group_of_stages_runs_by_name(checkout, tmp_path):
    result = run(checkout, tmp_path, "kernels")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = verdicts(tmp_path)
    assert list(found) == ["kernel-cell", "kernels-all"]
    assert all(verdict.startswith("skipped=no-cuda (") for verdict in found.values())


def test_an_unknown_stage_is_refused_after_packing_what_ran(checkout, tmp_path):
    result = run(checkout, tmp_path, "benchmark-everything")
    assert result.returncode == 2
    assert "unknown stage benchmark-everything" in (tmp_path / "gpu-session.log").read_text()
    assert (tmp_path / "gpu-results.tar.gz").exists()


@pytest.mark.skipif(not GPU_PACK.is_file(), reason=f"{GPU_PACK} not found")
def test_prepare_packs_mnist_and_the_commit(tmp_path, data_root):
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    shutil.copy(REPO / "bench" / "gpu_session.sh", root / "bench")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True, timeout=60)
    subprocess.run(git + ["add", "bench"], check=True, timeout=60)
    subprocess.run(git + ["commit", "-q", "-m", "t"], check=True, timeout=60)
    head = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, GPU_PACK=str(GPU_PACK), FASTCNN_DATA=str(data_root))
    result = subprocess.run(["bash", str(root / "bench" / "gpu_session.sh"), "prepare"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in (root / ".gpu" / "data" / "MNIST" / "raw").iterdir()) == sorted(
        path.name for path in (data_root / "MNIST" / "raw").glob("*.gz"))
    assert (root / ".gpu" / "commit").read_text().strip() == head
