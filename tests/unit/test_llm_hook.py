"""ClientSettings from Airflow connections, and the hook that wraps them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from airflow.models.connection import Connection as ModelConnection
from airflow.sdk import Connection

from llm_hook import ClientSettings, LLMClient, LLMConfigError, LLMHook

KEY = "sk-hook-test-0123456789"
MODEL = "test-model"


def connection(**fields: Any) -> Connection:
    """Return an LLM connection; its extra names `MODEL` unless the test gives a model."""
    fields.setdefault("conn_type", "llm_batch")
    fields.setdefault("password", KEY)
    fields.setdefault("extra", {})
    if isinstance(fields["extra"], dict):
        fields["extra"] = {"model": MODEL, **fields["extra"]}
        fields["extra"] = json.dumps(fields["extra"])
    return Connection(conn_id=fields.pop("conn_id", "llm_default"), **fields)


def test_full_base_url_key_and_extra_fields() -> None:
    extra = {
        "model": "sim-large",
        "timeout_s": 12.5,
        "connect_timeout_s": 2,
        "max_attempts": 6,
        "max_rounds": 2,
        "max_rate_limit_waits": 9,
        "backoff_base_s": 0.1,
        "backoff_max_s": 3,
        "max_retry_after_s": 30,
        "price_input_per_1k": 0.5,
        "price_output_per_1k": 1.5,
        "adapter": "batch",
    }
    settings = ClientSettings.from_connection(
        connection(host="https://llm.example.com/api/", extra=extra)
    )
    assert settings.base_url == "https://llm.example.com/api"
    assert settings.api_key == KEY
    assert settings.conn_id == "llm_default"
    for name, value in extra.items():
        assert getattr(settings, name) == value


def test_defaults_when_extra_names_only_the_model() -> None:
    settings = ClientSettings.from_connection(connection(host="http://127.0.0.1:8765"))
    assert (settings.adapter, settings.model) == ("batch", MODEL)
    assert (settings.connect_timeout_s, settings.timeout_s) == (5.0, 30.0)
    assert (settings.max_attempts, settings.max_rounds, settings.max_rate_limit_waits) == (4, 3, 20)
    assert (settings.backoff_base_s, settings.backoff_max_s, settings.max_retry_after_s) == (
        0.5,
        20.0,
        60.0,
    )
    assert (settings.price_input_per_1k, settings.price_output_per_1k) == (0.0, 0.0)


def test_answer_limits_default_to_twice_the_read_timeout_and_caps_below_mongodb_documents() -> None:
    settings = ClientSettings.from_connection(
        connection(host="http://127.0.0.1:8765", extra={"timeout_s": 12})
    )
    assert (settings.request_deadline_s, settings.deadline_s) == (None, 24.0)
    assert settings.max_response_bytes == 8 * 1024 * 1024
    assert settings.max_output_bytes == 4 * 1024 * 1024  # a results document holds 16 MiB
    assert settings.max_tokens_ceiling == 4096


def test_answer_limits_are_read_from_the_extra_also_as_text() -> None:
    conn = Connection.from_uri(
        "llm-batch://:sk-from-uri-123@127.0.0.1:8765/http?model=sim-small&request_deadline_s=45"
        "&max_response_bytes=1048576&max_output_bytes=65536&max_tokens_ceiling=800",
        conn_id="llm_uri",
    )
    settings = ClientSettings.from_connection(conn)
    assert settings.deadline_s == 45.0
    assert (settings.max_response_bytes, settings.max_output_bytes) == (1048576, 65536)
    assert settings.max_tokens_ceiling == 800


@pytest.mark.parametrize(
    ("fields", "base_url"),
    [
        ({"host": "127.0.0.1", "port": 8765}, "http://127.0.0.1:8765"),
        ({"host": "llm.example.com", "schema": "https"}, "https://llm.example.com"),
        (
            {"host": "llm.example.com", "schema": "HTTPS", "port": 8443},
            "https://llm.example.com:8443",
        ),
        ({"host": "http://127.0.0.1", "port": 8765}, "http://127.0.0.1:8765"),
        ({"host": "http://127.0.0.1:8765", "port": 8765}, "http://127.0.0.1:8765"),
        ({"host": "llm.example.com/v2/"}, "http://llm.example.com/v2"),
    ],
)
def test_base_url_from_host_port_and_schema(fields: dict[str, Any], base_url: str) -> None:
    assert ClientSettings.from_connection(connection(**fields)).base_url == base_url


def test_uri_form_with_extra_values_as_text() -> None:
    conn = Connection.from_uri(
        "llm-batch://:sk-from-uri-123@127.0.0.1:8765/http?model=sim-large&timeout_s=7&max_attempts=2",
        conn_id="llm_uri",
    )
    settings = ClientSettings.from_connection(conn)
    assert settings.base_url == "http://127.0.0.1:8765"
    assert settings.api_key == "sk-from-uri-123"
    assert (settings.model, settings.timeout_s, settings.max_attempts) == ("sim-large", 7.0, 2)


def test_orm_connection_model_works_too() -> None:
    conn = ModelConnection(
        conn_id="llm_orm",
        conn_type="llm_batch",
        host="http://h:1",
        password=KEY,
        extra=json.dumps({"model": MODEL}),
    )
    assert ClientSettings.from_connection(conn).base_url == "http://h:1"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"host": None}, "host (Base URL)"),
        ({"host": "ftp://llm.example.com"}, "http:// or https://"),
        ({"host": "llm.example.com", "schema": "ftp"}, "must be http or https"),
        ({"host": "http://user:pw@llm.example.com"}, "must not carry credentials"),
        ({"host": "http://h:8765", "port": 9000}, "clear the port field"),
        ({"host": "https://h", "schema": "http"}, "clear the schema"),
        ({"host": "http://h", "password": None}, "password (API key)"),
        ({"host": "http://h", "password": "  "}, "password (API key)"),
        ({"host": "http://h", "extra": {"timeout": 5}}, "Unknown field(s) timeout"),
        ({"host": "http://h", "extra": {"timeout_s": 0}}, "`timeout_s`"),
        ({"host": "http://h", "extra": {"timeout_s": "soon"}}, "`timeout_s`"),
        ({"host": "http://h", "extra": {"max_attempts": 0}}, "`max_attempts`"),
        ({"host": "http://h", "extra": {"max_attempts": 2.5}}, "`max_attempts`"),
        ({"host": "http://h", "extra": {"max_rounds": True}}, "`max_rounds`"),
        ({"host": "http://h", "extra": {"price_input_per_1k": -1}}, "`price_input_per_1k`"),
        ({"host": "http://h", "extra": {"adapter": "grpc"}}, "`adapter`"),
        ({"host": "http://h", "extra": {"model": ""}}, "`model`"),
        ({"host": "http://h", "extra": {"request_deadline_s": 0}}, "`request_deadline_s`"),
        ({"host": "http://h", "extra": {"request_deadline_s": "x"}}, "`request_deadline_s`"),
        ({"host": "http://h", "extra": {"max_response_bytes": 0}}, "`max_response_bytes`"),
        ({"host": "http://h", "extra": {"max_response_bytes": 1.5}}, "`max_response_bytes`"),
        ({"host": "http://h", "extra": {"max_output_bytes": -1}}, "`max_output_bytes`"),
        ({"host": "http://h", "extra": {"max_tokens_ceiling": 0}}, "`max_tokens_ceiling`"),
        ({"host": "http://h", "extra": {"max_tokens_ceiling": True}}, "`max_tokens_ceiling`"),
    ],
)
def test_bad_settings_name_the_connection_field_to_fix(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(LLMConfigError) as info:
        ClientSettings.from_connection(connection(**fields))
    message = str(info.value)
    assert says in message
    assert "llm_default" in message
    assert "pw@" not in message


def test_a_connection_without_a_model_is_refused_with_what_to_set() -> None:
    conn = Connection(
        conn_id="llm_default", conn_type="llm_batch", host="http://h", password=KEY, extra="{}"
    )
    with pytest.raises(
        LLMConfigError,
        match=r"No model: set `model` in the extra of connection "
        r"'llm_default'",
    ):
        ClientSettings.from_connection(conn)


def test_settings_repr_hides_the_api_key() -> None:
    settings = ClientSettings(base_url="http://h", api_key=KEY, model=MODEL)
    assert KEY not in repr(settings)
    assert KEY not in str(settings)


def test_settings_are_frozen() -> None:
    settings = ClientSettings(base_url="http://h", api_key=KEY, model=MODEL)
    with pytest.raises(AttributeError):
        settings.model = "other"  # type: ignore[misc]


def test_hook_init_stores_arguments_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookup(cls: type, conn_id: str) -> None:
        raise AssertionError("__init__ must not read the connection")

    monkeypatch.setattr(LLMHook, "get_connection", classmethod(no_lookup))
    hook = LLMHook(llm_conn_id="llm_other")
    assert hook.llm_conn_id == "llm_other"
    assert LLMHook().llm_conn_id == "llm_default"


def test_hook_builds_the_client_once_from_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_ENV",
        json.dumps(
            {
                "conn_type": "llm_batch",
                "host": "http://127.0.0.1:8765",
                "password": KEY,
                "extra": {"model": "sim-large"},
            }
        ),
    )
    hook = LLMHook(llm_conn_id="llm_env")
    client = hook.get_conn()
    assert isinstance(client, LLMClient)
    assert client.settings.model == "sim-large"
    assert client.settings.conn_id == "llm_env"
    assert hook.get_conn() is client
    client.close()


def test_test_connection_reports_an_unreachable_service(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) is closed on loopback: the connection is refused at once.
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_DOWN",
        json.dumps(
            {
                "conn_type": "llm_batch",
                "host": "http://127.0.0.1:9",
                "password": KEY,
                "extra": {"model": MODEL},
            }
        ),
    )
    ok, message = LLMHook(llm_conn_id="llm_down").test_connection()
    assert not ok
    assert "http://127.0.0.1:9" in message
    assert KEY not in message


def test_test_connection_reports_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_NOKEY",
        json.dumps({"conn_type": "llm_batch", "host": "http://127.0.0.1:9"}),
    )
    ok, message = LLMHook(llm_conn_id="llm_nokey").test_connection()
    assert not ok
    assert "password (API key)" in message


def test_hook_identity_for_the_connection_form() -> None:
    assert LLMHook.conn_name_attr == "llm_conn_id"
    assert LLMHook.default_conn_name == "llm_default"
    assert LLMHook.conn_type == "llm_batch"
    assert LLMHook.hook_name == "LLM batch service"


def test_ui_field_behaviour_placeholder_is_a_valid_extra() -> None:
    behaviour = LLMHook.get_ui_field_behaviour()
    assert behaviour["relabeling"] == {"host": "Base URL", "password": "API key"}
    assert set(behaviour["hidden_fields"]) == {"login", "schema", "port"}
    extra = behaviour["placeholders"]["extra"]
    settings = ClientSettings.from_connection(connection(host="http://h", extra=extra))
    assert settings.model == json.loads(extra)["model"]
