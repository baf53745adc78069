# The image every Airflow container of docker-compose.yaml runs (and the Helm chart's
# `images.airflow`): the official Airflow 3.3.2 image plus this project's pinned dependencies
# and code. Python 3.11, the version constraints.txt was resolved with.
FROM apache/airflow:3.3.2-python3.11

WORKDIR /opt/llm-batch
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt

# The project itself: include/ (llm_batch) and plugins/ (llm_hook) become importable packages.
COPY pyproject.toml README.md ./
COPY include ./include
COPY plugins ./plugins
RUN pip install --no-cache-dir --no-deps .
# airflow_local_settings.py imports the batch tasks' modules once per Airflow process, before a
# worker forks its task processes (llm_batch.preload; docs/performance.md).
RUN python -c "from pathlib import Path; from llm_batch.stack import write_local_settings; \
write_local_settings(Path('/opt/airflow'))"

# DAGs and the plugins folder (its .airflowignore keeps the loader off the installed hook package).
COPY dags /opt/airflow/dags
COPY plugins /opt/airflow/plugins
WORKDIR /opt/airflow
