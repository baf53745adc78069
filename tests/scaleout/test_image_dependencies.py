"""The image's dependency set resolves without conflicts and carries no development tools.

The Dockerfile installs `requirements.txt` on the official Airflow constraints minus the project's
own pins (scripts/image_constraints.py) and runs `pip check`. No Docker engine runs here, so the
same set is installed into a scratch venv: on the official constraints file when
`LLM_BATCH_AIRFLOW_CONSTRAINTS` names one (a path; GitHub is not reachable from CI), otherwise on
the project's runtime lock `constraints.txt`, which says so in the test's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from image_constraints import canonical, merged, pinned_names

DEV_TOOLS = {"pytest", "mypy", "ruff", "openai", "secantusdb", "playwright", "pytest-timeout"}


def test_the_merge_keeps_official_pins_except_the_projects_own() -> None:
    official = ["# comment", "pymongo==4.10.1", "Flask==2.2.5", "celery==5.5.2", ""]
    requirements = ["apache-airflow==3.3.2", "pymongo==4.20.0", "# x", "-r other.txt"]
    assert merged(official, requirements) == ["Flask==2.2.5", "celery==5.5.2"]
    assert pinned_names(["Foo_Bar.baz==1", "x>=2"]) == {"foo-bar-baz"}
    assert canonical("SQLAlchemy_Utils") == "sqlalchemy-utils"


def test_the_image_requirements_install_without_conflicts_or_dev_tools(tmp_path: Path) -> None:
    requirements = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    official = os.environ.get("LLM_BATCH_AIRFLOW_CONSTRAINTS")
    if official:
        lines = merged(Path(official).read_text().splitlines(), requirements)
        source = f"official constraints {official} minus the project's pins"
    else:
        lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
        source = "constraints.txt (set LLM_BATCH_AIRFLOW_CONSTRAINTS for the official file)"
    print(f"\nimage dependency set on {source}")
    constraints = tmp_path / "image-constraints.txt"
    constraints.write_text("\n".join(lines) + "\n")
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    airflow = next(line for line in requirements if line.startswith("apache-airflow=="))
    install = subprocess.run(
        [
            *pip,
            "install",
            "--quiet",
            airflow,
            "-r",
            str(REPO_ROOT / "requirements.txt"),
            "-c",
            str(constraints),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    project = subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert project.returncode == 0, project.stderr[-3000:]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    frozen = subprocess.run(
        [*pip, "list", "--format=freeze"], capture_output=True, text=True, timeout=120
    ).stdout
    installed = {canonical(line.split("==")[0]) for line in frozen.splitlines() if "==" in line}
    assert not installed & DEV_TOOLS, installed & DEV_TOOLS
    assert {"apache-airflow", "apache-airflow-providers-celery", "llm-batch-airflow"} <= installed
