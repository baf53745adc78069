"""The import directions the layout promises (README "Layout"), read from the source with `ast`.

- the domain (`llm_batch` outside `orchestration/` and `cli/`) and the LLM client (`llm_hook`
  except the hook class itself) import no Airflow, not even inside a function;
- the domain imports neither the Airflow layer nor the CLI;
- nothing in the runtime packages (`include/`) or the DAG and plugin files imports the dev
  tooling (`llm_batch_dev`), which the image does not install;
- the runtime modules import each other without cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ROOT = REPO_ROOT / "include"
RUNTIME_PACKAGES = ("llm_batch", "llm_hook")
AIRFLOW_FACING = ("llm_batch.orchestration", "llm_hook.hook", "llm_batch.workspace.airflow_access")
"""The only runtime modules that may import Airflow."""
OUTER_LAYERS = ("llm_batch.orchestration", "llm_batch.cli", "llm_batch.workspace")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_modules() -> dict[str, Path]:
    return {
        module_name(path, RUNTIME_ROOT): path
        for package in RUNTIME_PACKAGES
        for path in sorted((RUNTIME_ROOT / package).rglob("*.py"))
    }


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Yield every module `path` imports, at any depth of the file, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # `from llm_batch import config` imports the module llm_batch.config.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def is_within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


MODULES = runtime_modules()


def test_the_layout_finds_the_runtime_modules() -> None:
    # Guards the checks below against passing on an empty or misplaced tree.
    assert {
        "llm_batch.processing",
        "llm_batch.orchestration.dag_factory",
        "llm_hook.client",
    } <= set(MODULES)


@pytest.mark.parametrize(
    "module", [m for m in MODULES if not is_within(m, AIRFLOW_FACING)], ids=str
)
def test_the_domain_and_the_llm_client_import_no_airflow(module: str) -> None:
    airflow = sorted(
        name for name in imported_names(MODULES[module], module) if is_within(name, "airflow")
    )
    assert not airflow, f"{module} imports {airflow}: move that code to llm_batch.orchestration"


@pytest.mark.parametrize(
    "module",
    [m for m in MODULES if is_within(m, "llm_batch") and not is_within(m, OUTER_LAYERS)],
    ids=str,
)
def test_the_domain_imports_neither_the_airflow_layer_nor_the_cli(module: str) -> None:
    outward = sorted(
        name for name in imported_names(MODULES[module], module) if is_within(name, OUTER_LAYERS)
    )
    assert not outward, f"{module} imports {outward}: the domain must not depend on its callers"


def test_nothing_the_image_installs_imports_the_dev_tooling() -> None:
    files = {**MODULES}
    for folder in ("dags", "plugins"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            files[f"{folder}/{path.name}"] = path
    offenders = {
        module: sorted(n for n in imported_names(path, module) if is_within(n, "llm_batch_dev"))
        for module, path in files.items()
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert not offenders, f"runtime code imports the dev tooling: {offenders}"


def test_the_runtime_modules_import_each_other_without_cycles() -> None:
    graph = {
        module: {
            name
            for name in imported_names(path, module)
            if name in MODULES and name != module and not module.startswith(name + ".")
        }
        for module, path in MODULES.items()
    }
    # A package's __init__ re-exporting its own submodules is not a cycle of the design.
    for module in graph:
        graph[module] = {n for n in graph[module] if not n.startswith(module + ".")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one cycle of `graph` as a path that ends where it starts, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            found = visit(target)
            if found:
                return found
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
