# Two images, two stages:
# - `simulator`: the local LLM service of docker-compose.yaml (`llm-simulator`), built with
#   `docker build --target simulator .`. It is dev tooling (llm_batch_dev) on the standard
#   library only, so a slim Python with that one package and none of its dependencies.
# - the last stage, the default target: the image every Airflow container of
#   docker-compose.yaml runs (and the Helm chart's `images.airflow`): the official Airflow 3.3.2
#   image plus this project's pinned dependencies and code, without the dev tooling. Python
#   3.11, the version constraints.txt was resolved with.

FROM python:3.11-slim AS simulator

WORKDIR /opt/llm-batch-dev
COPY dev ./dev
# --no-deps: the simulator imports only the standard library; the stack, benchmark and demo in
# the same package need the dev setup and are not run here.
RUN pip install --no-cache-dir --no-deps ./dev
USER nobody
EXPOSE 8765
ENTRYPOINT ["python", "-m", "llm_batch_dev.simulator"]
CMD ["--host=0.0.0.0", "--port=8765"]


FROM apache/airflow:3.3.2-python3.11 AS airflow
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
ARG AIRFLOW_CONSTRAINTS_URL=https://raw.githubusercontent.com/apache/airflow/constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_VERSION}.txt

WORKDIR /opt/llm-batch
# Runtime requirements only, on the constraints the official image was built with (minus the
# packages requirements.txt pins itself): the image's own packages stay as Airflow tested them.
# `apache-airflow==` keeps pip from moving Airflow; `pip check` fails the build on a conflict.
COPY requirements.txt scripts/image_constraints.py ./
RUN curl -fsSL "${AIRFLOW_CONSTRAINTS_URL}" -o airflow-constraints.txt \
 && python image_constraints.py airflow-constraints.txt requirements.txt > image-constraints.txt \
 && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r requirements.txt -c image-constraints.txt \
 && pip check

# The project itself: include/ (llm_batch, llm_hook) becomes importable packages, with the
# entry points `llm-batch-compose-env` (compose's entrypoint) and the `llm_batch` connection type.
COPY pyproject.toml README.md ./
COPY include ./include
RUN pip install --no-cache-dir --no-deps .
# airflow_local_settings.py imports the batch tasks' modules once per Airflow process, before a
# worker forks its task processes (llm_batch.orchestration.preload; docs/performance.md).
RUN python -m llm_batch.orchestration.local_settings /opt/airflow

# DAGs and the plugins folder (the run listener).
COPY dags /opt/airflow/dags
COPY plugins /opt/airflow/plugins
WORKDIR /opt/airflow
