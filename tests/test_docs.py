"""The README and the docs/ pages keep their promises: every ```python block runs as written on a CPU (and prints
what the page says it prints), every relative link points at a file that exists, and the README stays short
enough to start from."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150

# A fenced block, possibly indented inside a list item; the closing fence has the opening one's indentation.
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[ ]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
# What may stand between a python block and the text block that shows its output.
PRINTS = re.compile(r"\s*(prints:?)?\s*", re.I)


@dataclasses.dataclass(frozen=True)
class Snippet:
    page: pathlib.Path
    line: int
    code: str
    expected_output: str | None  # the ```text block right after it, when there is one

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def dedent(body: str, indent: str) -> str:
    return "".join(line.removeprefix(indent) for line in body.splitlines(keepends=True))


def blocks(text: str) -> list[re.Match]:
    return list(FENCE.finditer(text))


def python_snippets(page: pathlib.Path) -> list[Snippet]:
    text = page.read_text()
    found = blocks(text)
    snippets = []
    for index, block in enumerate(found):
        if block["lang"] != "python":
            continue
        expected = None
        following = found[index + 1] if index + 1 < len(found) else None
        if (following is not None and following["lang"] == "text"
                and PRINTS.fullmatch(text[block.end():following.start()])):
            expected = dedent(following["body"], following["indent"])
        snippets.append(Snippet(page, text.count("\n", 0, block.start()) + 1,
                                dedent(block["body"], block["indent"]), expected))
    return snippets


SNIPPETS = [snippet for page in PAGES for snippet in python_snippets(page)]


def prose(text: str) -> str:
    """The page without its fenced blocks and inline code, where brackets and parentheses are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(page: pathlib.Path) -> list[str]:
    targets = [match["target"] for match in LINK.finditer(prose(page.read_text()))]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def test_the_pages_have_python_snippets():
    # A guard for the extraction itself: if the fence pattern stopped matching, every snippet test would vanish.
    assert len(PAGES) >= 4
    assert any(s.page == README for s in SNIPPETS)
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.name)
def test_python_snippet_runs_as_written(snippet: Snippet, tmp_path: pathlib.Path):
    # A reader's shell: a fresh interpreter in an empty folder, on the CPU, with the native kernel rather than the
    # Triton interpreter that conftest.py turns on for the other tests.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{snippet.name} failed:\n{done.stdout}\n{done.stderr}"
    if snippet.expected_output is not None:
        assert done.stdout == snippet.expected_output, (
            f"{snippet.name} printed something else than the page shows:\n{done.stdout}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page: pathlib.Path):
    broken = [target for target in relative_links(page)
              if not (page.parent / target.split("#", 1)[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    linked = {(README.parent / target.split("#", 1)[0]).resolve() for target in relative_links(README)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_every_fenced_block_is_closed():
    # An unclosed fence would swallow the rest of a page (and hide its python blocks from the tests above).
    for page in PAGES:
        fences = [line for line in page.read_text().splitlines() if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{page.relative_to(ROOT)} has an unclosed ``` block"
