"""The analysts' and reviewers' workspace in the Airflow UI: jobs, charts, the review queue.

`app` (FastAPI, no Airflow import) is mounted by the plugin `plugins/llm_batch_workspace.py`
with `airflow_access` (Airflow's login and permissions, the only module here importing Airflow).
"""
