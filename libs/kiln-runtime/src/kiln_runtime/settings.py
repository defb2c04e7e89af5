"""Settings every service shares; each service subclasses with its own fields.

A field reads the variable ``KILN_`` + its name in upper case (``ack_wait_s``: ``KILN_ACK_WAIT_S``);
only a field read from a variable of another form names it, with ``validation_alias``
(``NATS_URL``, ``DATABASE_URL``, an SDK's own key ...).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .collector import DEFAULT_THRESHOLDS


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", populate_by_name=True)

    nats_url: str = Field(
        default="nats://127.0.0.1:14222",
        validation_alias=AliasChoices("NATS_URL", "KILN_NATS_URL"),
    )
    nats_user: str | None = Field(default=None, validation_alias="NATS_USER")
    nats_password: str | None = Field(default=None, validation_alias="NATS_PASSWORD")
    log_level: str = Field(
        default="INFO", validation_alias=AliasChoices("KILN_LOG_LEVEL", "LOG_LEVEL")
    )
    log_json: bool = False
    # Delivery: a message not acked (nor heartbeated) within ack_wait is redelivered elsewhere.
    ack_wait_s: float = Field(default=10.0, gt=0)
    max_deliver: int = Field(default=20, ge=1)
    # A worker's /metrics, /livez and /readyz (kiln_runtime.health); 0: not served.
    health_port: int = Field(default=0, ge=0)
    # Liveness fails when the event loop has not beaten for this long, or a consume loop that
    # failed has not worked again for this long.
    health_stall_s: float = Field(default=20.0, gt=0)
    # On SIGTERM, how long handlers in flight may run on before they are handed back (keep it
    # below the pod's terminationGracePeriodSeconds).
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    # Give memory freed after a burst of work back to the OS (glibc's malloc_trim; kiln_runtime.memory).
    memory_trim: bool = True
    # The garbage collector's thresholds, "gen0,gen1,gen2" (kiln_runtime.collector).
    gc_thresholds: Annotated[tuple[int, int, int], NoDecode] = DEFAULT_THRESHOLDS
    # Copies of each stream kept by a NATS cluster (3 in production; 1 on a single server).
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # How often the client pings its server; after three unanswered pings it moves to another
    # node (a hung server is noticed in about 3 x this).
    nats_ping_interval_s: float = Field(default=5.0, gt=0)

    @field_validator("gc_thresholds", mode="before")
    @classmethod
    def _thresholds(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(
                    f"three whole numbers above 0, comma-separated (e.g. 100000,10,100): {value!r}"
                )
            return tuple(int(p) for p in parts)
        return value


class DatabaseSettings(CommonSettings):
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        validation_alias=AliasChoices("DATABASE_URL", "KILN_DATABASE_URL"),
    )
