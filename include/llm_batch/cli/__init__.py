"""The `llm-batch` command line: submit and follow jobs through Airflow's REST API and MongoDB."""

from llm_batch.cli.commands import main

__all__ = ["main"]
