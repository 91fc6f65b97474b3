"""The CLI's front: --help, --version and every `<command> --help` answer without importing torch; a closed pipe
ends a command quietly; torch's "No CUDA runtime is found" notice is not printed; the usage hint names the
subcommand; an unexpected error is shortened at a word boundary."""

import os
import subprocess
import sys

import pytest
from helpers import REPO, assert_one_line_error, run_cli

from fastcnn.cli import SIGPIPE_STATUS, shorten

HELP_COMMANDS = [["--help"], ["--version"], *([command, "--help"] for command in
                                              ("train", "bench", "eval", "predict", "env"))]
HEAVY = ("torch", "torchvision", "triton", "numpy")

# The CLI's own modules, imported under a bare stand-in for the package root, so that what they import is seen
# apart from what fastcnn/__init__.py imports for the Python API.
UNDER_A_BARE_ROOT = """
import sys, types
root = types.ModuleType("fastcnn")
root.__path__ = [{package!r}]
sys.modules["fastcnn"] = root
from fastcnn.cli import main
code = main(sys.argv[1:])
heavy = sorted(name for name in sys.modules if name.split(".")[0] in {heavy!r})
sys.stdout.flush()
print("HEAVY", heavy, file=sys.stderr)
sys.exit(code)
"""


def python(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO, **kwargs)


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=" ".join)
def test_the_cli_modules_import_no_torch_for_help_and_version(argv):
    script = UNDER_A_BARE_ROOT.format(package=str(REPO / "fastcnn"), heavy=HEAVY)
    result = python("-c", script, *argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(("usage: fastcnn", "fastcnn ")), result.stdout
    assert result.stderr.strip().splitlines()[-1] == "HEAVY []", result.stderr


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=" ".join)
def test_python_dash_m_fastcnn_help_imports_no_torch(argv):
    result = python("-X", "importtime", "-m", "fastcnn", *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported


def test_the_package_root_exports_lazily_and_accelerate_stays_the_function():
    script = ("import sys, fastcnn; assert 'torch' not in sys.modules, 'import fastcnn imported torch'; "
              "import fastcnn.accelerate.match; from fastcnn.accelerate import accelerate; "
              "assert fastcnn.accelerate is accelerate and callable(accelerate); "
              "assert sorted(fastcnn.__all__) == sorted([*fastcnn._EXPORTS, '__version__']); "
              "print(fastcnn.ConvReLUPool2d.__module__, fastcnn.conv_relu_pool.__module__)")
    result = python("-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["fastcnn.nn", "fastcnn.ops"]


def test_version_is_the_packages():
    import fastcnn

    result = python("-m", "fastcnn", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fastcnn {fastcnn.__version__}"


@pytest.mark.parametrize("argv, status", [
    (["bench", "--list"], (SIGPIPE_STATUS,)),
    (["env"], (SIGPIPE_STATUS,)),
    # argparse itself drops a help text it cannot write when the text is longer than the output buffer
    (["--help"], (0, SIGPIPE_STATUS)),
    (["train", "--help"], (0, SIGPIPE_STATUS)),
], ids=lambda value: " ".join(value) if isinstance(value[0], str) else "")
def test_a_reader_that_goes_away_ends_the_command_quietly(argv, status):
    # The parent closes its end of the pipe before the command writes anything: every write then fails (EPIPE),
    # as when `head` has read what it wanted.
    process = subprocess.Popen([sys.executable, "-m", "fastcnn", *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) in status, err
    assert err == ""


def test_a_pipe_closed_midway_leaves_no_traceback(tmp_path):
    # What a shell does: `fastcnn train --help | head -1`.
    result = subprocess.run(f"'{sys.executable}' -m fastcnn train --help | head -1", shell=True, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("usage: fastcnn train")
    assert result.stderr == ""


CUDA_HOME_SCRIPT = """
import logging
{start}
import torch.utils.cpp_extension
logging.getLogger("torch.utils.cpp_extension").warning("another notice of that logger")
"""


def test_the_no_cuda_runtime_notice_is_silenced_and_nothing_else(tmp_path):
    # torch.utils.cpp_extension logs it when a CUDA build of torch finds CUDA_HOME but no GPU (every CPU compile).
    env = dict(os.environ, CUDA_HOME=str(tmp_path))
    plain = python("-c", CUDA_HOME_SCRIPT.format(start=""), env=env)
    if "No CUDA runtime is found" not in plain.stderr:
        pytest.skip("torch here does not print the notice (a GPU is visible, or torch was built without CUDA)")
    started = python("-c", CUDA_HOME_SCRIPT.format(start="from fastcnn.cli import main; main(['--version'])"),
                     env=env)
    assert started.returncode == 0, started.stderr
    assert "No CUDA runtime is found" not in started.stderr
    assert "another notice of that logger" in started.stderr


@pytest.mark.parametrize("argv, hint", [
    (["train", "--epoch", "1"], "fastcnn train --help"),
    (["bench", "--no-such-flag"], "fastcnn bench --help"),
    (["eval", "run", "--top", "3"], "fastcnn eval --help"),
    (["predict", "run", "a.png", "--dataset", "mnist"], "fastcnn predict --help"),
    (["env", "--verbose"], "fastcnn env --help"),
    (["train", "--kernel", "cudnn"], "fastcnn train --help"),
    (["--no-such-flag"], "fastcnn --help"),
    (["trian"], "fastcnn --help"),
])
def test_the_usage_hint_names_the_subcommand(argv, hint, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, f"(see `{hint}`)")


def test_train_epoch_is_not_taken_for_epochs(capsys):
    code, _, err = run_cli(["train", "--epoch", "1"], capsys)
    assert code == 2
    assert_one_line_error(err, "unrecognized arguments: --epoch 1")


def test_an_unexpected_error_is_cut_at_a_word_boundary(capsys, monkeypatch):
    import fastcnn.env_report

    words = " ".join(f"word{i}" for i in range(200))

    def fails():
        raise RuntimeError(f"something broke:\n  {words}")

    monkeypatch.setattr(fastcnn.env_report, "collect", fails)
    code, out, err = run_cli(["env"], capsys)
    assert code == 1 and out == ""
    assert_one_line_error(err, "RuntimeError: something broke: word0 word1", "(rerun with --debug for the traceback)")
    shown = err.split("RuntimeError: ")[1].split(" (rerun")[0]
    assert shown.endswith(" ...") and shown[:-4].split()[-1] in words.split()


@pytest.mark.parametrize("text, limit, expected", [
    ("short enough", 20, "short enough"),
    ("one two three four", 12, "one two ..."),
    ("one two, three", 9, "one two ..."),
    ("a\n  multi-line\tmessage", 40, "a multi-line message"),
    ("averyveryverylongword and more", 10, "averyveryv ..."),
])
def test_shorten(text, limit, expected):
    assert shorten(text, limit) == expected

