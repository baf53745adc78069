"""The CLI refuses what the form would refuse, before it triggers anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_batch.cli import commands as cli
from llm_batch.request import REQUEST_KEYS, default_of


def conf_for(*argv: str) -> dict[str, object]:
    args = cli.build_parser().parse_args(["submit", *argv])
    return cli.build_conf(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--all", "--limit", "0"], "limit 0 is out of range"),
        (["--all", "--limit", "5001"], "limit 5001 is out of range"),
        (["--filter", '{"$where": "1"}'], "$where is not allowed"),
        (["--filter", "{oops"], "filter is not valid JSON"),
        (["--task-ids", "a,b,a"], "'a' is listed twice"),
        (["--all", "--llm-params", "[1"], "llm_params is not valid JSON"),
        (["--all", "--job-id", "bad id"], "job_id 'bad id' is not valid"),
    ],
)
def test_bad_input_is_refused_with_exit_code_2(argv: list[str], message: str) -> None:
    with pytest.raises(cli.CliError) as info:
        conf_for(*argv)
    assert info.value.code == cli.EXIT_REFUSED
    assert message in str(info.value)


def test_all_selects_everything_with_an_empty_filter_and_gets_a_job_id() -> None:
    conf = conf_for("--all", "--limit", "10")
    assert conf["filter"] == {} and conf["task_ids"] is None and conf["limit"] == 10
    assert str(conf["job_id"]).startswith("job-")


def test_filter_text_is_sent_as_an_object_for_the_form_schema() -> None:
    conf = conf_for("--filter", '{"payload.lang": "en"}', "--instructions", "Summarize")
    assert conf["filter"] == {"payload.lang": "en"}
    assert conf["instructions"] == "Summarize"


def test_task_ids_come_from_a_file_one_per_line(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("t1\nt2\n\nt3\n")
    assert conf_for("--task-ids-file", str(ids))["task_ids"] == ["t1", "t2", "t3"]


def test_mongo_uri_comes_from_the_stack_file_unless_the_environment_sets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"mongo_uri": "mongodb://127.0.0.1:1/db"}))
    monkeypatch.setenv("LLM_BATCH_HOME", str(tmp_path))
    monkeypatch.delenv("LLM_BATCH_MONGO_URI", raising=False)
    assert cli.Settings.load().mongo_uri == "mongodb://127.0.0.1:1/db"
    monkeypatch.setenv("LLM_BATCH_MONGO_URI", "mongodb://elsewhere:27017/x")
    assert cli.Settings.load().mongo_uri == "mongodb://elsewhere:27017/x"


def test_redrive_and_operations_flags_reach_the_conf() -> None:
    conf = conf_for(
        "--retry-of", "job-1", "--include-needs-review", "--max-cost-usd", "2.5",
        "--review-below", "0.7", "--no-cache",
    )  # fmt: skip
    assert conf["retry_of"] == "job-1" and conf["include_needs_review"] is True
    assert conf["filter"] is None and conf["task_ids"] is None
    assert conf["max_cost_usd"] == 2.5 and conf["review_below"] == 0.7
    assert conf["use_cache"] is False


def test_a_review_threshold_above_one_is_refused() -> None:
    with pytest.raises(cli.CliError, match=r"review_below 1\.5 is out of range"):
        conf_for("--all", "--review-below", "1.5")


def test_every_declared_field_has_a_submit_flag_that_reaches_the_conf() -> None:
    conf = conf_for(
        "--all", "--limit", "7", "--instructions", "Summarize", "--model", "sim-small",
        "--job-id", "job-9", "--llm-params", '{"temperature": 0}', "--no-cache", "--dry-run",
        "--review-below", "0.5", "--max-cost-usd", "1", "--alert-failure-rate", "0.1",
        "--cache-below-review",
        "--delivery", "provider_batch", "--resend-via", "sync",
    )  # fmt: skip
    assert conf == {
        "task_ids": None, "filter": {}, "limit": 7, "instructions": "Summarize",
        "model": "sim-small", "job_id": "job-9", "llm_params": {"temperature": 0},
        "use_cache": False, "dry_run": True, "review_below": 0.5, "max_cost_usd": 1.0,
        "alert_failure_rate": 0.1, "cache_below_review": True,
        "delivery": "provider_batch", "resend_via": "sync",
    }  # fmt: skip
    # The re-drive fields, exclusive with --all, are covered by the re-drive test above.
    assert set(conf) | {"retry_of", "include_needs_review"} == set(REQUEST_KEYS)


def test_flags_left_out_are_not_sent_so_the_forms_defaults_apply() -> None:
    conf = conf_for("--task-ids", "a,b")
    assert conf["task_ids"] == ["a", "b"] and conf["filter"] is None
    assert "use_cache" not in conf and "alert_failure_rate" not in conf
    assert conf["limit"] == default_of("limit")


@pytest.mark.parametrize(
    "argv",
    [
        ["--task-ids", "a", "--filter", "{}"],
        ["--all", "--retry-of", "job-1"],
        ["--task-ids-file", "ids.txt", "--task-ids", "a"],
        ["--limit", "5"],
    ],
)
def test_submit_takes_exactly_one_selection(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["submit", *argv])
    assert info.value.code == cli.EXIT_REFUSED


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--all", "--max-cost-usd", "nan"], "max_cost_usd must be a finite number"),
        (["--all", "--review-below", "nan"], "review_below must be a finite number"),
        (["--all", "--alert-failure-rate", "inf"], "alert_failure_rate must be a finite number"),
        (["--all", "--llm-params", '{"temperature": NaN}'], "NaN and infinity are refused"),
        (["--filter", '{"a": ' * 100_000 + "1" + "}" * 100_000], "filter nests deeper than"),
        (["--all", "--llm-params", "[" * 100_000 + "]" * 100_000], "llm_params nests deeper than"),
    ],
)
def test_non_finite_and_deeply_nested_input_is_refused_before_anything_is_sent(
    argv: list[str], message: str
) -> None:
    with pytest.raises(cli.CliError) as info:
        conf_for(*argv)
    assert info.value.code == cli.EXIT_REFUSED
    assert message in str(info.value)


def test_a_conf_json_cannot_carry_is_reported_as_such_not_as_airflow_not_answering() -> None:
    from llm_batch.cli.airflow_client import AirflowAPIError, AirflowClient

    # Nothing listens on port 9: a request that were sent would fail as "did not answer".
    client = AirflowClient("http://127.0.0.1:9", "user", "password")
    client._token = "token"
    with pytest.raises(AirflowAPIError) as info:
        client.trigger_dag_run("llm_batch_job", {"max_cost_usd": float("nan")}, run_id="r")
    assert "JSON cannot carry" in str(info.value)
    assert "did not answer" not in str(info.value)
