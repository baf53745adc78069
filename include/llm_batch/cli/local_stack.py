"""Where the local stack records its addresses: written by the dev stack, read by the CLI.

The stack (`llm_batch_dev.stack`) writes `<work dir>/stack.json` with the Airflow URL, the
admin user's password file and the MongoDB URI; the CLI takes its defaults from there, and the
environment (`LLM_BATCH_*`) overrides each of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
"""The checkout the package was installed from in development (`pip install -e`)."""
MARKER = "LLM_BATCH_STACK_HOME"
"""Environment variable set on every process of a stack, to its work dir."""
STATE_FILE = "stack.json"


class StackFileError(RuntimeError):
    """The stack file exists but cannot be read."""


def default_work_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return `$LLM_BATCH_HOME`, else the checkout's `.work`."""
    env = os.environ if environ is None else environ
    home = env.get("LLM_BATCH_HOME")
    return Path(home).expanduser().resolve() if home else REPO_ROOT / ".work"


def state_file(environ: Mapping[str, str] | None = None) -> Path:
    """Return the state file of the default work dir (`$LLM_BATCH_HOME/stack.json`)."""
    return default_work_dir(environ) / STATE_FILE


def read_stack_file(path: Path) -> dict[str, Any]:
    """Return the stack file's fields, or {} if there is no stack file."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StackFileError(
            f"Cannot read the stack file {path} ({exc}); run `make down` and `make up` to "
            "rewrite it."
        ) from exc


def read_password(password_file: Path, username: str) -> str | None:
    """Return `username`'s password from a SimpleAuthManager password file, if it is there."""
    try:
        passwords = json.loads(password_file.read_text())
    except (OSError, ValueError):
        return None
    password = passwords.get(username) if isinstance(passwords, dict) else None
    return str(password) if password else None
