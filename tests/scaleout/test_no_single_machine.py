"""Nothing in the code that runs in task instances assumes one machine.

With the CeleryExecutor (or Kubernetes) consecutive task instances of one job run in different
processes on different machines. So the code that runs in them (the DAG files and every project
module they reach, found by following imports) must keep no state between task instances in the
process, and pass nothing through the local file system: the shared state is MongoDB (results,
checkpoints, the cache, the rate limiter's budget) and Airflow's metadata DB (XCom, small
descriptors only; the Celery e2e test reads them back). These checks read the source; each is
shown to catch a bad example.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.scaleout.task_code import task_time_files

MUTATING_METHODS = frozenset(
    {
        "append",
        "extend",
        "insert",
        "add",
        "update",
        "setdefault",
        "pop",
        "popitem",
        "clear",
        "remove",
        "discard",
        "appendleft",
        "__setitem__",
    }
)
MUTABLE_FACTORIES = frozenset(
    {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque", "WeakValueDictionary"}
)
MEMOIZERS = frozenset({"cache", "lru_cache", "cached_property"})
LOCAL_FILE_CALLS = frozenset(
    {
        "open",
        "write_text",
        "write_bytes",
        "mkdir",
        "makedirs",
        "mkstemp",
        "mkdtemp",
        "NamedTemporaryFile",
        "TemporaryDirectory",
        "TemporaryFile",
    }
)
LOCAL_STATE_MODULES = frozenset({"tempfile", "shelve", "sqlite3", "dbm", "pickle", "shutil"})


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name(node.func)
    return None


def _is_mutable(value: ast.expr | None) -> bool:
    if isinstance(value, ast.Dict | ast.List | ast.Set | ast.ListComp | ast.DictComp | ast.SetComp):
        return True
    return isinstance(value, ast.Call) and _name(value.func) in MUTABLE_FACTORIES


def process_state_problems(source: str) -> list[str]:
    """Module-level state that functions change, `global`, and memoised functions."""
    tree = ast.parse(source)
    mutable: set[str] = set()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign) and _is_mutable(node.value):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign) and _is_mutable(node.value):
            targets = [node.target]
        mutable |= {t.id for t in targets if isinstance(t, ast.Name)}

    problems = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for function in functions:
        for decorator in function.decorator_list:
            if _name(decorator) in MEMOIZERS:
                problems.append(
                    f"line {function.lineno}: {function.name} is memoised in the process"
                )
        for node in ast.walk(function):
            if isinstance(node, ast.Global):
                problems.append(f"line {node.lineno}: `global {', '.join(node.names)}`")
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
                targets = (
                    node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
                )
                for target in targets:
                    if (
                        isinstance(target, ast.Subscript)
                        and isinstance(target.value, ast.Name)
                        and target.value.id in mutable
                    ):
                        problems.append(
                            f"line {node.lineno}: writes module-level {target.value.id}"
                        )
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATING_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in mutable
            ):
                problems.append(f"line {node.lineno}: changes module-level {node.func.value.id}")
    return problems


def local_file_problems(source: str) -> list[str]:
    """Calls that write local files, and imports of modules that keep state on local disk."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _name(node.func) in LOCAL_FILE_CALLS:
            problems.append(f"line {node.lineno}: {_name(node.func)}(...) uses the local disk")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            for module in modules:
                if module and module.split(".")[0] in LOCAL_STATE_MODULES:
                    problems.append(f"line {node.lineno}: imports {module}")
    return problems


def _relative(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def test_the_task_code_is_found_by_following_imports_from_the_dag_files() -> None:
    found = {_relative(path) for path in task_time_files()}
    for expected in (
        "dags/llm_batch_job.py",
        "include/llm_batch/orchestration/task_bodies.py",
        "include/llm_batch/store.py",
        "include/llm_hook/hook.py",
        "include/llm_hook/client.py",
    ):
        assert expected in found
    # The local stack and its tools never run inside a task instance.
    assert not [path for path in found if path.startswith("dev/")]


@pytest.mark.parametrize("path", task_time_files(), ids=_relative)
def test_task_code_keeps_no_state_in_the_process_between_task_instances(path: Path) -> None:
    problems = process_state_problems(path.read_text())
    assert not problems, (
        f"{_relative(path)} keeps state in the process, which the next task instance (on "
        f"another worker) will not see; keep it in MongoDB instead: {problems}"
    )


@pytest.mark.parametrize("path", task_time_files(), ids=_relative)
def test_task_code_shares_nothing_through_local_files(path: Path) -> None:
    problems = local_file_problems(path.read_text())
    assert not problems, (
        f"{_relative(path)} uses the local disk, which the next task instance (on another "
        f"worker) cannot read; keep it in MongoDB or pass a small id through XCom: {problems}"
    )


def test_the_checks_catch_process_state_and_local_files() -> None:
    cached = "_SEEN = {}\n\ndef remember(key, value):\n    _SEEN[key] = value\n"
    appended = "DONE = []\n\ndef mark(batch):\n    DONE.append(batch)\n"
    global_counter = "COUNT = 0\n\ndef bump():\n    global COUNT\n    COUNT += 1\n"
    memoised = "import functools\n\n@functools.lru_cache\ndef answers(job):\n    return job\n"
    constant = "NAMES = {'a': 1}\n\ndef read(key):\n    return NAMES[key]\n"
    assert process_state_problems(cached) == ["line 4: writes module-level _SEEN"]
    assert process_state_problems(appended) == ["line 4: changes module-level DONE"]
    assert process_state_problems(global_counter) == ["line 4: `global COUNT`"]
    assert process_state_problems(memoised) == ["line 4: answers is memoised in the process"]
    assert process_state_problems(constant) == []

    spool = "from pathlib import Path\n\ndef save(batch):\n    Path('/tmp/x').write_text(batch)\n"
    assert local_file_problems(spool) == ["line 4: write_text(...) uses the local disk"]
    assert local_file_problems("import tempfile\n") == ["line 1: imports tempfile"]
    assert local_file_problems("def f(p):\n    return open(p).read()\n") == [
        "line 2: open(...) uses the local disk"
    ]
