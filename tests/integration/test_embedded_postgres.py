"""The dev package's embedded PostgreSQL with a TCP port, as the compose topology test uses it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from llm_batch_dev.stack import postgres, processes

PASSWORD = 'p@ss%2F w"rd/#?'


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[postgres.PostgresLayout]:
    # Under the system's temp dir: run as root, the server's own user must reach it.
    root = Path(tempfile.mkdtemp(prefix="llm-batch-test-pg-"))
    try:
        with postgres.running_server(root, 20, tcp_port=processes.free_port()) as layout:
            admin = psycopg2.connect(layout.dsn("postgres"))
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute('CREATE ROLE "app" LOGIN PASSWORD %s', (PASSWORD,))
            admin.close()
            yield layout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def login(layout: postgres.PostgresLayout, user: str, password: str) -> str:
    connection = psycopg2.connect(
        host=postgres.TCP_HOST, port=layout.port, user=user, password=password, dbname="postgres"
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user")
            row = cursor.fetchone()
    finally:
        connection.close()
    return str(row[0]) if row else ""


def test_a_role_logs_in_over_tcp_with_its_password_only(
    tcp_server: postgres.PostgresLayout,
) -> None:
    assert login(tcp_server, "app", PASSWORD) == "app"
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        login(tcp_server, "app", PASSWORD + "x")


def test_the_superuser_has_no_password_so_it_connects_on_the_socket_only(
    tcp_server: postgres.PostgresLayout,
) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        login(tcp_server, tcp_server.role, PASSWORD)
    connection = psycopg2.connect(tcp_server.dsn("postgres"))
    connection.close()
