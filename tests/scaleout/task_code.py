"""Which source files run inside task instances: the DAG files and everything they import."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = {
    "llm_batch": REPO_ROOT / "include" / "llm_batch",
    "llm_hook": REPO_ROOT / "include" / "llm_hook",
}
TASK_ENTRY_POINTS = ("llm_batch.orchestration.task_bodies", "llm_batch.orchestration.dag_factory")
"""Imported by the DAG files' task bodies (inside the functions, so found here by name too)."""


def module_file(module: str) -> Path | None:
    """The file of a project module (`llm_batch.store`), or None for anything else."""
    top, _, rest = module.partition(".")
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].joinpath(*rest.split(".")) if rest else PACKAGES[top]
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules `path` imports anywhere (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from llm_batch import store` imports the module llm_batch.store.
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if module_file(name) is not None}


def task_time_files() -> list[Path]:
    """DAG files plus every project module reachable from them or from the task entry points."""
    dag_files = sorted((REPO_ROOT / "dags").glob("*.py"))
    pending = [*dag_files, *(p for m in TASK_ENTRY_POINTS if (p := module_file(m)) is not None)]
    seen: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            target = module_file(module)
            if target is not None and target not in seen:
                pending.append(target)
            # A package's __init__ runs on import of any of its modules.
            parent = module_file(module.rsplit(".", 1)[0]) if "." in module else None
            if parent is not None and parent not in seen:
                pending.append(parent)
    return sorted(seen)
