"""The provider metadata Airflow discovers through the `apache_airflow_provider` entry point.

It registers the connection type `llm_batch` with its hook, so the Airflow UI offers it in the
connection form, labels the fields for an HTTP API with a key, and shows the Test button (which
calls `LLMHook.test_connection`: a model listing, no tokens spent). Airflow reads the form's
layout from here without importing the hook.
"""

from __future__ import annotations

import json
from typing import Any

from llm_hook.settings import EXTRA_EXAMPLE

PACKAGE_NAME = "llm-batch-airflow"
"""The distribution's name (pyproject.toml): Airflow refuses provider info naming another."""
CONN_TYPE = "llm_batch"
HOOK_CLASS = "llm_hook.hook.LLMHook"

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["login", "schema", "port"],
    "relabeling": {"host": "Base URL", "password": "API key"},
    "placeholders": {
        "host": "http://127.0.0.1:8765",
        "password": "the service's API key",
        "extra": json.dumps(EXTRA_EXAMPLE, indent=2),
    },
}


def get_provider_info() -> dict[str, Any]:
    """Return the provider info Airflow's ProvidersManager validates and loads."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "LLM batch",
        "description": "Connection type and hook for the LLM service of the LLM batch pipeline.",
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": HOOK_CLASS,
                "hook-name": "LLM batch service",
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
    }
