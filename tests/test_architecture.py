"""The package's shape, checked: the import layers (import-linter's contracts in pyproject.toml), one concept per
module (no module of fastcnn/ over 450 lines), and imports that say where they come from."""

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_FILES = sorted((REPO / "fastcnn").rglob("*.py"))
KERNEL_FILES = sorted((REPO / "kernels").glob("*.py"))
MAX_LINES = 450


def imports_of(path: pathlib.Path):
    """(line, imported module, at module level?) for every import in ``path`` (relative ones resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, node.col_offset == 0
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:-node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module
            yield node.lineno, name, node.col_offset == 0


def test_the_import_layers_hold():
    # The contracts (layers, no cycles) live in pyproject.toml under [tool.importlinter].
    lint_imports = pathlib.Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "broken" not in run.stdout.lower().replace("0 broken", ""), run.stdout


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE_FILES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"


def test_the_package_never_imports_its_own_root():
    # `from fastcnn import X` inside the package hides which module X lives in, and makes every module depend on
    # everything fastcnn/__init__.py exports (the root imports the top layers).
    inside = [p for p in PACKAGE_FILES if p != REPO / "fastcnn" / "__init__.py"]
    found = [f"{p.relative_to(REPO)}:{line}" for p in inside for line, name, _ in imports_of(p) if name == "fastcnn"]
    assert not found, found


def test_kernels_import_nothing_from_the_rest_of_the_package():
    # kernels/ installs as fastcnn.kernels but is the bottom layer: pure kernels, launchers and their rules.
    found = [f"{p.relative_to(REPO)}:{line} {name}" for p in KERNEL_FILES for line, name, _ in imports_of(p)
             if name.startswith("fastcnn") and not name.startswith("fastcnn.kernels")]
    assert not found, found
