"""Settings, read once from the environment (prefix PAYSTREAM_) or a .env file, then passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the processor. Defaults reach the retailer's docker-compose from the host."""

    model_config = SettingsConfigDict(
        env_prefix="PAYSTREAM_", env_file=".env", extra="ignore", frozen=True
    )

    kafka_bootstrap_servers: str = "localhost:29092"
    database_url: str = "postgresql://tech:test@localhost:5432/payments"
    gateway_url: str = "http://localhost:9000"
    log_url: str = "http://localhost:9000"
    group_id: str = "paystream"
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
    revalidate_every_s: float = Field(default=30.0, gt=0)
    revalidate_max_attempts: int = Field(default=10, ge=0)

    # Seal kept records' raw bytes (card numbers included) with AES-GCM; see paystream.sealing.
    kept_key_file: Path | None = None

    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8000, ge=0, le=65535)
    operator_token: str | None = Field(default=None, repr=False)
    log_level: str = "info"

    def as_env(self) -> dict[str, str]:
        """The PAYSTREAM_* variables that give another process these settings."""
        return {
            f"PAYSTREAM_{name.upper()}": str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }
