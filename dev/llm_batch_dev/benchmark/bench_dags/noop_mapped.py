"""A bare mapped DAG for the benchmark: `count` no-op instances in the pool `llm_api`.

The orchestration floor of Airflow itself on this machine: the same mapping, pool and
executor as `process_batch`, with nothing to do in each instance. Only the benchmark's own
dags folder holds this file; the shipped `dags/` does not.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

POOL_NAME = "llm_api"


@dag(
    dag_id="bench_noop_mapped",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    max_active_tasks=256,
    params={"count": Param(500, type="integer", minimum=1, maximum=100_000)},
    tags=["benchmark"],
)
def bench_noop_mapped() -> None:
    @task
    def plan(params: dict[str, int]) -> list[int]:
        return list(range(int(params["count"])))

    @task(pool=POOL_NAME)
    def noop(n: int) -> None:
        return None

    noop.expand(n=plan())  # type: ignore[call-arg]  # Airflow passes `params`


bench_noop_mapped()
