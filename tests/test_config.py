"""Settings: Kafka client properties the ecosystem's way, secrets from files, none of them shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from paystream.config import Settings
from paystream.errors import ConfigurationError

SECRET = "s3cr3t-Pa55-0f-the-test"


def _settings(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_a_java_client_properties_file_configures_every_kafka_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A managed cluster's client.properties works as handed out: its JAAS line becomes
    librdkafka's username and password, PAYSTREAM_KAFKA__* variables override the file, and
    the bootstrap servers come from the file unless PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS is set."""
    properties = tmp_path / "client.properties"
    properties.write_text(
        "# from the provider's console\n"
        "bootstrap.servers=broker.example:9092\n"
        "security.protocol=SASL_SSL\n"
        "sasl.mechanism=PLAIN\n"
        "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required \\\n"
        f"    username='KEY' password='{SECRET}';\n"
        "session.timeout.ms=45000\n"
    )
    settings = _settings(
        monkeypatch,
        PAYSTREAM_KAFKA_CONFIG_FILE=str(properties),
        PAYSTREAM_KAFKA__SESSION_TIMEOUT_MS="30000",
        PAYSTREAM_KAFKA__SSL_CA_LOCATION="/etc/ssl/ca.pem",
    )
    assert {
        "bootstrap.servers": "broker.example:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "PLAIN",
        "sasl.username": "KEY",
        "sasl.password": SECRET,
        "session.timeout.ms": "30000",
        "ssl.ca.location": "/etc/ssl/ca.pem",
    } == settings.kafka_client()
    monkeypatch.setenv("PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS", "other:9093")
    assert "other:9093" == Settings(_env_file=None).kafka_client()["bootstrap.servers"]  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("PAYSTREAM_KAFKA__ENABLE_AUTO_COMMIT", "true", "committed only after"),
        ("PAYSTREAM_KAFKA__AUTO_OFFSET_RESET", "latest", "must not miss"),
        ("PAYSTREAM_KAFKA__ISOLATION_LEVEL", "read_uncommitted", "committed transactions"),
        ("PAYSTREAM_KAFKA__PARTITION_ASSIGNMENT_STRATEGY", "range", "share of both topics"),
        ("PAYSTREAM_KAFKA__GROUP_ID", "mine", "PAYSTREAM_GROUP_ID"),
    ],
)
def test_properties_correctness_depends_on_cannot_be_overridden(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str
) -> None:
    settings = _settings(monkeypatch, **{variable: value})
    with pytest.raises(ConfigurationError, match=f"cannot be set: .*{words}"):
        settings.kafka_client()


def test_secrets_come_from_files_and_never_show(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PAYSTREAM_<NAME>_FILE reads a secret from a file (its trailing newline dropped), for the
    database password, the gateway and operator tokens and any Kafka property; none of them
    appears in the settings' repr."""
    files = {}
    for name in ("db", "gateway", "operator", "sasl"):
        files[name] = tmp_path / name
        files[name].write_text(f"{SECRET}-{name}\n")
    settings = _settings(
        monkeypatch,
        PAYSTREAM_DATABASE_URL="postgresql://tech@db.example:5432/payments?sslmode=verify-full",
        PAYSTREAM_DATABASE_PASSWORD_FILE=str(files["db"]),
        PAYSTREAM_GATEWAY_TOKEN_FILE=str(files["gateway"]),
        PAYSTREAM_OPERATOR_TOKEN_FILE=str(files["operator"]),
        PAYSTREAM_KAFKA__SASL_PASSWORD_FILE=str(files["sasl"]),
    )
    assert (
        f"postgresql://tech:{SECRET}-db@db.example:5432/payments?sslmode=verify-full"
        == settings.database_dsn
    )
    assert {"Authorization": f"Bearer {SECRET}-gateway"} == settings.third_party_headers()
    assert settings.operator_token is not None
    assert f"{SECRET}-operator" == settings.operator_token.get_secret_value()
    assert f"{SECRET}-sasl" == settings.kafka_client()["sasl.password"]
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


def test_a_named_auth_header_carries_the_bare_token(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(
        monkeypatch, PAYSTREAM_GATEWAY_TOKEN=SECRET, PAYSTREAM_GATEWAY_AUTH_HEADER="X-Api-Key"
    )
    assert {"X-Api-Key": SECRET} == settings.third_party_headers()


def test_a_secret_set_twice_or_unreadable_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "token"
    secret.write_text(SECRET)
    with pytest.raises(ConfigurationError, match=r"Set PAYSTREAM_GATEWAY_TOKEN or .*_FILE, not"):
        _settings(
            monkeypatch,
            PAYSTREAM_GATEWAY_TOKEN="x",
            PAYSTREAM_GATEWAY_TOKEN_FILE=str(secret),
        )
    monkeypatch.delenv("PAYSTREAM_GATEWAY_TOKEN")
    monkeypatch.setenv("PAYSTREAM_GATEWAY_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match=r"Cannot read PAYSTREAM_GATEWAY_TOKEN_FILE \("):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_as_env_gives_a_child_process_the_same_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secrets and Kafka properties survive the trip through a child's environment."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        gateway_token=SECRET,  # type: ignore[arg-type]
        kafka={"security_protocol": "SASL_SSL"},
    )
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    again = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.third_party_headers() == again.third_party_headers()
    assert settings.kafka_client() == again.kafka_client()


def test_the_commands_say_what_is_wrong_with_the_settings_in_one_sentence(
    tmp_path: Path,
) -> None:
    """An unreadable secret file or a value of the wrong kind ends any command with exit 2 and
    one line naming the variable, not a traceback."""
    cases = {
        "PAYSTREAM_GATEWAY_TOKEN_FILE": (
            str(tmp_path / "missing"),
            "Cannot read PAYSTREAM_GATEWAY",
        ),
        "PAYSTREAM_BATCH_SIZE": ("many", "invalid settings: PAYSTREAM_BATCH_SIZE"),
    }
    for variable, (value, sentence) in cases.items():
        result = subprocess.run(
            [sys.executable, "-m", "paystream", "errors"],
            env={"PATH": os.environ["PATH"], variable: value},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,  # no .env of the checkout
        )
        assert 2 == result.returncode, result.stderr
        assert sentence in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tech:test@db:5432/payments", "postgresql://tech@db:5432/payments"),
        (
            "postgresql://tech:test@db1:5432,db2:5433/payments?target_session_attrs=read-write",
            "postgresql://tech@db1:5432,db2:5433/payments",
        ),
        ("postgresql:///payments", "postgresql://@localhost/payments"),
    ],
)
def test_a_database_url_is_shown_without_its_password(url: str, shown: str) -> None:
    """Messages name the database's hosts (several, for a failover) but never the password."""
    from paystream.app import redacted

    assert shown == redacted(url)


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("errors", "--reason", "declinedd"),
        ("errors", "--reason", "DECLINED; DROP TABLE payments"),
        ("replay", "--reason", "\x00declined"),
        ("errors", "--type", "networks"),
        ("replay", "--type", "x" * 10_000),
    ],
)
def test_an_unknown_reason_or_type_is_refused_with_the_valid_ones(
    command: str, option: str, value: str
) -> None:
    """A misspelt, hostile or huge --reason/--type is refused (exit 2) before anything is read,
    naming every valid value, rather than silently matching nothing."""
    from typer.testing import CliRunner

    from paystream.cli import app
    from paystream.model import ErrorType, Reason

    result = CliRunner().invoke(app, [command, option, value])
    assert 2 == result.exit_code
    valid = Reason if option == "--reason" else ErrorType
    words = " ".join(result.output.split())
    assert all(f"'{member.value}'" in words for member in valid)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e400", "61", "soon", ""])
def test_a_stamp_interval_out_of_range_or_not_a_number_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """PAYSTREAM_STAMP_INTERVAL_S is a number of seconds from 0 to 60: a negative, NaN, infinite
    or huge one would stamp accounts never or ceaselessly, and is refused at start."""
    with pytest.raises(ValidationError, match="stamp_interval_s"):
        _settings(monkeypatch, PAYSTREAM_STAMP_INTERVAL_S=value)


def test_a_stamp_interval_with_a_nul_in_the_env_file_is_refused(tmp_path: Path) -> None:
    """A NUL cannot be in an environment variable, but it can be in a .env file."""
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"PAYSTREAM_STAMP_INTERVAL_S=0.25\x00\n")
    with pytest.raises(ValidationError, match="stamp_interval_s"):
        Settings(_env_file=env_file)  # type: ignore[call-arg]


def test_a_stamp_interval_of_zero_stamps_after_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 0 == _settings(monkeypatch, PAYSTREAM_STAMP_INTERVAL_S="0").stamp_interval_s


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e400", "86401", "a minute", ""])
def test_a_stall_threshold_out_of_range_or_not_a_number_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """PAYSTREAM_STALL_AFTER_S is a positive number of seconds up to a day: zero, negative,
    NaN, infinite or huge would raise the stall alarm on every retry, or never, and is refused
    at start."""
    with pytest.raises(ValidationError, match="stall_after_s"):
        _settings(monkeypatch, PAYSTREAM_STALL_AFTER_S=value)


@pytest.mark.parametrize("value", ["", " ", "\t\n", "\n"])
def test_a_blank_secret_is_no_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    """An empty or blank secret, from a variable (compose's `${VAR:-}`) or from a file holding
    only a newline, counts as unset: no operator token, no gateway token, no database password,
    the default database URL."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(value)
    from_variables = _settings(
        monkeypatch,
        PAYSTREAM_OPERATOR_TOKEN=value,
        PAYSTREAM_GATEWAY_TOKEN=value,
        PAYSTREAM_DATABASE_PASSWORD_FILE=str(secret_file),
        PAYSTREAM_DATABASE_URL=value,
    )
    assert (None, None, None) == (
        from_variables.operator_token,
        from_variables.gateway_token,
        from_variables.database_password,
    )
    assert {} == from_variables.third_party_headers()
    assert Settings.model_fields["database_url"].default == from_variables.database_url
    monkeypatch.delenv("PAYSTREAM_OPERATOR_TOKEN")
    from_file = _settings(monkeypatch, PAYSTREAM_OPERATOR_TOKEN_FILE=str(secret_file))
    assert from_file.operator_token is None


def test_a_short_operator_token_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator token under 24 characters guards too little: refused at start, in an error
    that does not print it."""
    with pytest.raises(ValidationError, match="at least 24 characters") as refused:
        _settings(monkeypatch, PAYSTREAM_OPERATOR_TOKEN="short-Secret-77")
    assert "short-Secret-77" not in str(refused.value)
    long_enough = "x" * 24
    token = _settings(monkeypatch, PAYSTREAM_OPERATOR_TOKEN=long_enough).operator_token
    assert token is not None
    assert long_enough == token.get_secret_value()


@pytest.mark.parametrize(
    "value",
    [
        "*",
        "a b",
        "évil.example",
        "http://x.example",
        "x.example:80",
        "a..b",
        "-a.example",
        "a" * 64,
    ],
)
def test_an_allowed_host_that_is_no_host_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """PAYSTREAM_WEB_ALLOWED_HOSTS holds host names (or `.domain`): a wildcard, a URL, a port,
    a space, a label over 63 characters are refused at start."""
    with pytest.raises(ValidationError, match="web_allowed_hosts"):
        _settings(monkeypatch, PAYSTREAM_WEB_ALLOWED_HOSTS=f"ok.example,{value}")


def test_allowed_hosts_add_to_loopbacks_names(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, PAYSTREAM_WEB_ALLOWED_HOSTS=" Dash.Example.com , .corp.lan")
    assert {"localhost", "127.0.0.1", "::1", "dash.example.com", ".corp.lan"} == (
        settings.allowed_hosts
    )
