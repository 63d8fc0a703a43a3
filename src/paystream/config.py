"""Settings, read once from the environment (prefix PAYSTREAM_) or a .env file, then passed down.

Secrets can come from files, the Docker/Kubernetes secrets convention: PAYSTREAM_<NAME>_FILE
holds the path of a file whose content is the value of PAYSTREAM_<NAME> (for the names in
`SECRET_FILE_FIELDS`, and for any Kafka property: PAYSTREAM_KAFKA__SASL_PASSWORD_FILE).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import javaproperties
from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from paystream.errors import ConfigurationError

SECRET_FILE_FIELDS = ("database_url", "database_password", "gateway_token", "operator_token")

MIN_OPERATOR_TOKEN_CHARS = 24
"""The operator token guards replay and, beyond loopback, every page of payment data: one
shorter than this is refused at start (`openssl rand -hex 16` makes one of 32)."""

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The names a server bound to loopback is reached by: always allowed as a request's Host."""

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"  # one label of a DNS name
_HOST_NAME = re.compile(rf"\.?{_LABEL}(\.{_LABEL})*")

# librdkafka properties the processor's correctness depends on: paystream sets them, nobody else.
FIXED_KAFKA_PROPERTIES = {
    "enable.auto.commit": "offsets are committed only after a batch's database transaction",
    "enable.auto.offset.store": "offsets are committed only after a batch's database transaction",
    "auto.offset.reset": "a new consumer group must not miss what was produced before it joined",
    "isolation.level": "only records of committed transactions may become payments",
    "partition.assignment.strategy": "every instance must get its share of both topics",
    "group.protocol": "paystream chooses the consumer group protocol",
    "group.id": "the group is PAYSTREAM_GROUP_ID",
}


class _SecretFiles(PydanticBaseSettingsSource):
    """PAYSTREAM_<NAME>_FILE → the value of <NAME>, read from that file (one trailing newline
    dropped, as secrets written by `echo` have one)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every secret file at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in SECRET_FILE_FIELDS:
            variable = f"PAYSTREAM_{name.upper()}"
            path = os.environ.get(f"{variable}_FILE")
            if path is None:
                continue
            if variable in os.environ:
                raise ConfigurationError(f"Set {variable} or {variable}_FILE, not both.")
            values[name] = _read_secret(f"{variable}_FILE", path)
        return values


def _read_secret(setting: str, path: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"Cannot read {setting} ({path}): {reason}.") from exc
    return text[:-1] if text.endswith("\n") else text


class Settings(BaseSettings):
    """Every knob of the processor. Defaults reach the retailer's docker-compose from the host."""

    model_config = SettingsConfigDict(
        env_prefix="PAYSTREAM_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        env_nested_delimiter="__",
        hide_input_in_errors=True,  # an error must not print a secret it refused
    )

    kafka_bootstrap_servers: str = "localhost:29092"
    # Any librdkafka property for every Kafka client paystream opens: a Java-style .properties
    # file, then PAYSTREAM_KAFKA__<PROPERTY> variables (dots as underscores) over it.
    kafka_config_file: Path | None = None
    kafka: dict[str, str] = Field(default_factory=dict, repr=False)
    database_url: str = Field(default="postgresql://tech:test@localhost:5432/payments", repr=False)
    # Replaces the URL's password, so that the URL itself needs no secret.
    database_password: SecretStr | None = None
    gateway_url: str = "http://localhost:9000"
    log_url: str = "http://localhost:9000"
    # The third party (gateway and log API): a CA bundle to trust for HTTPS, and a token sent
    # as `Authorization: Bearer <token>`, or as the whole value of another named header.
    third_party_ca_file: Path | None = None
    gateway_token: SecretStr | None = None
    gateway_auth_header: str = "Authorization"
    group_id: str = "paystream"
    # KIP-848's consumer group protocol where the brokers take it ("auto"), or one forced.
    group_protocol: Literal["auto", "consumer", "classic"] = "auto"
    online_topic: str = "online"
    offline_topic: str = "offline"

    batch_size: int = Field(default=4000, ge=1, le=10_000)
    batches_in_flight: int = Field(default=2, ge=1, le=64)
    gateway_max_in_flight: int = Field(default=256, ge=1, le=10_000)
    gateway_timeout_s: float = Field(default=5.0, gt=0)
    gateway_attempts: int = Field(default=3, ge=1)
    gateway_budget_s: float = Field(default=10.0, gt=0)
    # The circuit breaker: this many transient failures in a row open it; it stays open for the
    # cool-down, which doubles while probes keep failing, up to the max. Once the gateway is
    # back, every kept payment is re-validated within max cool-down + revalidate_every_s + the
    # drain (README, "Re-validation").
    gateway_breaker_threshold: int = Field(default=20, ge=1)
    gateway_breaker_cooldown_s: float = Field(default=2.0, gt=0)
    gateway_breaker_max_cooldown_s: float = Field(default=30.0, gt=0)
    log_timeout_s: float = Field(default=5.0, gt=0)
    outbox_batch: int = Field(default=200, ge=1)
    outbox_idle_s: float = Field(default=1.0, gt=0)
    db_retry_max_s: float = Field(default=5.0, gt=0)
    # Accounts are stamped by passes that apply what several batches left due (paystream.stamping):
    # at most one pass this often while batches follow each other (at once when none else is in
    # flight), so last_payment_date trails a stored payment by up to this long, and a batch's
    # offsets are committed after its pass.
    stamp_interval_s: float = Field(default=0.25, ge=0, le=60)
    # A partition whose batch has failed to become durable for this long counts as stalled:
    # alarmed in its metric, readiness, the dashboard and `paystream status` (paystream.stalls).
    stall_after_s: float = Field(default=60.0, gt=0, le=86_400)
    # Apply the database migrations this version lacks at start (under a lock, safe with several
    # instances). Off: `paystream migrate` does it, as a step before a rollout, and an instance
    # waits until the schema is at its version.
    migrate: bool = True
    revalidate_every_s: float = Field(default=30.0, gt=0)
    revalidate_max_attempts: int = Field(default=10, ge=0)

    # Seal kept records' raw bytes (card numbers included) with AES-GCM; see paystream.sealing.
    kept_key_file: Path | None = None

    # OpenTelemetry: spans exported over OTLP/HTTP to this collector (its base URL, e.g.
    # http://otel-collector:4318); tracing is off, at no cost, without it.
    otlp_endpoint: str | None = None

    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8000, ge=0, le=65535)
    # Host names the web server answers to besides loopback's and IP addresses, comma-separated
    # (`dashboard.example.com`, or `.example.com` for it and its subdomains): any other Host
    # header is refused, so that a web page cannot read the dashboard by DNS rebinding.
    web_allowed_hosts: str = ""
    operator_token: SecretStr | None = None
    log_level: str = "info"

    @field_validator(*SECRET_FILE_FIELDS[1:], mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        """An empty or blank secret (compose's `${VAR:-}`, a file holding only a newline) is
        no secret: unset, never a value every empty guess matches."""
        if isinstance(value, str | SecretStr):
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            if not text.strip():
                return None
        return value

    @field_validator("database_url", mode="before")
    @classmethod
    def _blank_url_is_default(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return cls.model_fields["database_url"].default
        return value

    @field_validator("operator_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_OPERATOR_TOKEN_CHARS:
            raise ValueError(
                f"the operator token must be at least {MIN_OPERATOR_TOKEN_CHARS} characters "
                "(openssl rand -hex 16 makes one)"
            )
        return value

    @field_validator("web_allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for name in value.split(","):
            name = name.strip().lower()
            if name and not _HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"{name[:60]!r} is not a host name (a name such as dashboard.example.com, "
                    "or .example.com for it and its subdomains)"
                )
        return value

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """The Host names the web server answers to (lower case; `.name` for a domain and its
        subdomains); IP addresses are answered to as well (a rebinding needs a name)."""
        names = (n.strip().lower() for n in self.web_allowed_hosts.split(","))
        return frozenset(LOOPBACK_HOSTS) | {n for n in names if n}

    @property
    def web_exposed(self) -> bool:
        """Whether the web server listens beyond loopback."""
        return self.web_host not in LOOPBACK_HOSTS

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _SecretFiles(settings_cls), env_settings, dotenv_settings)

    @property
    def database_dsn(self) -> str:
        """The URL to connect with: PAYSTREAM_DATABASE_PASSWORD, if set, in place of its own."""
        if self.database_password is None:
            return self.database_url
        parts = urlsplit(self.database_url)
        user = quote(parts.username or "", safe="")
        password = quote(self.database_password.get_secret_value(), safe="")
        host = parts.hostname or ""
        netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def third_party_headers(self) -> dict[str, str]:
        """Headers every gateway and log-API call carries: the auth token, if any."""
        if self.gateway_token is None:
            return {}
        token = self.gateway_token.get_secret_value()
        if self.gateway_auth_header.lower() == "authorization":
            return {"Authorization": f"Bearer {token}"}
        return {self.gateway_auth_header: token}

    def kafka_client(self) -> dict[str, str]:
        """The librdkafka properties of every client: the config file, the PAYSTREAM_KAFKA__*
        variables over it, and the bootstrap servers (PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS when set,
        else the file's, else the default). Raises ConfigurationError, in one sentence, for a
        property paystream must set itself or a file it cannot read."""
        properties: dict[str, str] = {}
        if self.kafka_config_file is not None:
            try:
                properties.update(javaproperties.loads(self.kafka_config_file.read_text()))
            except OSError as exc:
                raise ConfigurationError(
                    f"Cannot read PAYSTREAM_KAFKA_CONFIG_FILE ({self.kafka_config_file}): "
                    f"{exc.strerror or type(exc).__name__}."
                ) from exc
        for name, value in self.kafka.items():
            if name.endswith("_file"):
                setting = f"PAYSTREAM_KAFKA__{name.upper()}"
                properties[name.removesuffix("_file").replace("_", ".")] = _read_secret(
                    setting, value
                )
            else:
                properties[name.replace("_", ".")] = value
        _translate_jaas(properties)
        for name in properties:
            if name in FIXED_KAFKA_PROPERTIES:
                raise ConfigurationError(
                    f"The Kafka property {name} cannot be set: "
                    f"{FIXED_KAFKA_PROPERTIES[name]}; remove it from the Kafka configuration."
                )
        if (
            "kafka_bootstrap_servers" in self.model_fields_set
            or "bootstrap.servers" not in properties
        ):
            properties["bootstrap.servers"] = self.kafka_bootstrap_servers
        return properties

    def as_env(self) -> dict[str, str]:
        """The PAYSTREAM_* variables that give another process these settings."""
        variables = {}
        for name, value in self.model_dump().items():
            if value is None or name == "kafka":
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            variables[f"PAYSTREAM_{name.upper()}"] = str(value)
        for name, value in self.kafka.items():
            variables[f"PAYSTREAM_KAFKA__{name.upper()}"] = value
        return variables


def _translate_jaas(properties: dict[str, str]) -> None:
    """A Java client's `sasl.jaas.config` (what managed Kafka services hand out) becomes
    librdkafka's sasl.username and sasl.password; librdkafka does not read JAAS itself."""
    jaas = properties.pop("sasl.jaas.config", None)
    if jaas is None:
        return
    if "PlainLoginModule" not in jaas and "ScramLoginModule" not in jaas:
        raise ConfigurationError(
            "sasl.jaas.config names a login module librdkafka cannot use; give sasl.username "
            "and sasl.password (PLAIN or SCRAM) or librdkafka's own OAUTHBEARER properties."
        )
    fields = dict(_jaas_options(jaas))
    if "username" not in fields or "password" not in fields:
        raise ConfigurationError("sasl.jaas.config has no username and password options.")
    properties.setdefault("sasl.username", fields["username"])
    properties.setdefault("sasl.password", fields["password"])
    if "sasl.mechanism" in properties:  # the Java name; librdkafka's is plural
        properties.setdefault("sasl.mechanisms", properties.pop("sasl.mechanism"))


def _jaas_options(jaas: str) -> list[tuple[str, str]]:
    """key="value" or key='value' options of a JAAS line."""
    options = []
    rest = jaas
    while "=" in rest:
        key, _, rest = rest.partition("=")
        key = key.split()[-1] if key.split() else ""
        rest = rest.lstrip()
        if not rest or rest[0] not in "\"'":
            break
        quote_char, rest = rest[0], rest[1:]
        value, _, rest = rest.partition(quote_char)
        options.append((key, value))
    return options
