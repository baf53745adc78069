"""Write the `airflow_local_settings.py` that preloads the batch tasks' imports.

Used by the dev stack for its `$AIRFLOW_HOME` and by the Dockerfile for the image.
"""

from __future__ import annotations

from pathlib import Path

LOCAL_SETTINGS = '''"""Preload the batch tasks' imports: see llm_batch.orchestration.preload."""

import llm_batch.orchestration.preload  # noqa: F401
'''


def write_local_settings(airflow_home: Path) -> Path:
    """Write `<airflow_home>/config/airflow_local_settings.py` (see `preload`)."""
    path = airflow_home / "config" / "airflow_local_settings.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOCAL_SETTINGS)
    return path


if __name__ == "__main__":
    import sys

    print(write_local_settings(Path(sys.argv[1] if len(sys.argv) > 1 else "/opt/airflow")))
