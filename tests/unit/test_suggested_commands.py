"""Every `llm-batch ...` command the pipeline tells an operator to run exists in the CLI.

Alerts, run notes and error messages suggest commands; the CLI is where they must work. The
commands are collected from the string literals of the runtime code (not the docs), so a new
message that suggests a command is checked without touching this test.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_batch.cli.commands import build_parser

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "include").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])
SAMPLE_ID = "job-1"
COMMAND = re.compile(r"llm-batch ([a-z][^`()\n;,\"']*)")
"""`llm-batch` and a subcommand, up to the backtick, bracket or clause end that closes it."""
PLACEHOLDER = re.compile(r"\{[a-z_]+(?:![rsa])?\}")
"""A `str.format` field such as `{job_id}` in a template filled in later."""


def literal_texts(tree: ast.Module) -> Iterator[str]:
    """Yield each string literal that is not a docstring, f-strings with values filled in."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            skipped.add(id(body[0].value))  # a docstring describes, it does not suggest
        if isinstance(node, ast.JoinedStr):
            skipped.update(id(part) for part in node.values)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.JoinedStr):
            yield "".join(
                part.value if isinstance(part, ast.Constant) else SAMPLE_ID for part in node.values
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield PLACEHOLDER.sub(SAMPLE_ID, node.value)


def suggested_commands() -> list[tuple[str, str]]:
    """Return (source file, command) for every command suggested in the runtime code."""
    found: set[tuple[str, str]] = set()
    for path in SOURCES:
        for text in literal_texts(ast.parse(path.read_text(), str(path))):
            for match in COMMAND.finditer(PLACEHOLDER.sub(SAMPLE_ID, text)):
                command = match.group(1).strip().rstrip(".:")
                found.add((str(path.relative_to(ROOT)), command))
    return sorted(found)


SUGGESTED = suggested_commands()


def test_commands_are_found_where_operators_read_them() -> None:
    sources = {source for source, _ in SUGGESTED}
    assert {
        "include/llm_batch/alerts.py",
        "include/llm_batch/orchestration/run_events.py",
        "include/llm_batch/jobs.py",
    } <= sources
    assert ("include/llm_batch/alerts.py", f"submit --retry-of {SAMPLE_ID}") in SUGGESTED


@pytest.mark.parametrize(("source", "command"), SUGGESTED, ids=[c for _, c in SUGGESTED])
def test_every_suggested_command_parses_with_the_cli(source: str, command: str) -> None:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(shlex.split(command))
    except SystemExit:
        pytest.fail(
            f"{source} suggests `llm-batch {command}`, which the CLI refuses:\n{errors.getvalue()}"
        )
