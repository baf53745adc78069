"""The Airflow-facing layer: the DAG factory, the task bodies, callbacks, run events, preload.

The only part of `llm_batch` that imports Airflow; the domain modules beside it stay plain Python.
"""
