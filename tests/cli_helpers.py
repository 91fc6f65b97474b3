"""Helpers for tests that run the real CLI (``fastcnn.cli.main``) and check its one-line errors."""

from fastcnn.cli import main


def run_cli(argv, capsys):
    """``fastcnn ARGV`` through the real CLI: (exit code, stdout, stderr stripped)."""
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def assert_one_line_error(err, *words):
    """``err`` is exactly one ``fastcnn: error: ...`` line, without a traceback, naming every one of ``words``."""
    assert err.startswith("fastcnn: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
