"""The retailer's docker-compose, without Docker: Kafka, PostgreSQL with the original schema and
accounts, and the simulator, each on a chosen or free port."""

from __future__ import annotations

import ssl
import sys
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

from paystream.config import Settings
from paystream_tooling.devenv.certs import ServerCertificate
from paystream_tooling.devenv.kafka import KafkaBroker, create_topics
from paystream_tooling.devenv.postgres import EmbeddedPostgres
from paystream_tooling.devenv.processes import ChildProcess, answers_ok, ensure_port_free, free_port

DB_USER, DB_PASSWORD, DB_NAME = "tech", "test", "payments"
TEMPLATE_DB = "payments_template"


def original_schema_sql() -> list[str]:
    folder = resources.files("paystream_tooling.devenv") / "sql"
    return [
        f.read_text()
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".sql")
    ]


def create_database(admin_url: str, name: str, *, template: str | None = None) -> None:
    """Create a database owned by the application user, empty or cloned from a template."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        if template is None:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(DB_USER)
                )
            )
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(template), sql.Identifier(DB_USER)
                )
            )


def load_original_schema(url: str) -> None:
    """What the compose's init SQL files do: the two tables and 2000 accounts."""
    with psycopg.connect(url, autocommit=True) as conn:
        for script in original_schema_sql():
            conn.execute(script.encode())


class SimulatorProcess:
    """`paystream simulator` as a child process."""

    def __init__(
        self,
        home: Path,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerCertificate | None = None,
    ):
        """With `tls`, it serves HTTPS with that certificate."""
        self.home = home
        self.host = host
        self.port = port or free_port(host)
        self.settings = settings
        self.tls = tls
        self._process: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"{'http' if self.tls is None else 'https'}://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """What a client needs to trust this simulator (None over plain HTTP)."""
        return None if self.tls is None else ssl.create_default_context(cafile=self.tls.ca)

    def start(self, *extra: str) -> None:
        ensure_port_free(
            self.host, self.port, "the simulator", "stop what uses it or pass another port"
        )
        env = {
            "PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka_bootstrap_servers,
            "PAYSTREAM_DATABASE_URL": self.settings.database_url,
            "PAYSTREAM_ONLINE_TOPIC": self.settings.online_topic,
            "PAYSTREAM_OFFLINE_TOPIC": self.settings.offline_topic,
            "PATH": "/usr/bin:/bin",
        }
        argv = [
            sys.executable,
            "-m",
            "paystream",
            "simulator",
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self._tls_args(),
            *extra,
        ]
        self._process = ChildProcess("simulator", argv, self.home / "simulator.log", env=env)
        self._process.wait_until(self._answers, 30, "answering HTTP")

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]

    def _answers(self) -> bool:
        return answers_ok(self.url + "/status", self.ssl_context())

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None


class Stack:
    """Start with `start()`, stop with `stop()`; or use as a context manager."""

    def __init__(
        self,
        home: Path,
        *,
        kafka_port: int = 0,
        postgres_port: int = 0,
        database_url: str | None = None,
        partitions: int = 3,
        postgres_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.home = home = home.resolve()
        self.partitions = partitions
        self.kafka = KafkaBroker(home / "kafka", home.parent / "cache", port=kafka_port)
        self.external_database_url = database_url
        self.postgres = (
            None
            if database_url
            else EmbeddedPostgres(
                home / "postgres", port=postgres_port, server_settings=postgres_settings
            )
        )

    @property
    def admin_url(self) -> str:
        if self.postgres is None:
            assert self.external_database_url is not None
            return self.external_database_url
        return self.postgres.url()

    def database_url(self, name: str = DB_NAME) -> str:
        if self.postgres is None:
            assert self.external_database_url is not None
            return self.external_database_url
        return self.postgres.url(name, DB_USER, DB_PASSWORD)

    def start(self) -> None:
        started = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        if self.postgres is not None:
            self.postgres.start()
            with psycopg.connect(self.postgres.url(), autocommit=True) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,)
                ).fetchone()
                if not exists:
                    conn.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} CREATEDB").format(
                            sql.Identifier(DB_USER), sql.Literal(DB_PASSWORD)
                        )
                    )
            create_database(self.postgres.url(), TEMPLATE_DB)
            load_original_schema(self.postgres.url(TEMPLATE_DB, DB_USER, DB_PASSWORD))
            create_database(self.postgres.url(), DB_NAME, template=TEMPLATE_DB)
        self.kafka.start()
        self.kafka.create_topics(["online", "offline"], self.partitions)
        self.startup_s = time.monotonic() - started

    def fresh_database(self, name: str) -> str:
        """A new database cloned from the original schema and accounts (embedded server only)."""
        assert self.postgres is not None, "per-test databases need the embedded server"
        create_database(self.postgres.url(), name, template=TEMPLATE_DB)
        return self.database_url(name)

    def create_topics(self, names: list[str], partitions: int | None = None) -> None:
        create_topics(self.kafka.bootstrap, names, partitions or self.partitions)

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "kafka_bootstrap_servers": self.kafka.bootstrap,
            "database_url": self.database_url(),
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.kafka.stop()
        if self.postgres is not None:
            self.postgres.stop()

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
