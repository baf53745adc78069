"""Connection arguments for the embedded stack's SQLite metadata database.

Airflow reads them through `[database] sql_alchemy_connect_args` (an import path), set by
`llm_batch.stack`.
"""

from __future__ import annotations

from typing import Any

SQLITE_CONNECT_ARGS: dict[str, Any] = {"timeout": 60}
"""Wait up to 60 s for SQLite's write lock instead of 5 s: on a loaded 2-core machine a writer
held it longer than 5 s and the scheduler died with `database is locked` (docs/performance.md)."""
