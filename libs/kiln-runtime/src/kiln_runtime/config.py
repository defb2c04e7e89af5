"""Tiers and model prices: data, not code (kiln.yaml beside this module, or KILN_CONFIG)."""

from __future__ import annotations

import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from kiln_contracts import Usage

DEFAULT_PATH = Path(__file__).with_name("kiln.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tier(Strict):
    monthly_budget_usd: Decimal = Field(ge=0)
    concurrent_builds: int = Field(ge=1)
    per_build_cap_usd: Decimal = Field(ge=0)
    models: dict[str, str] = Field(description="Model per role, e.g. {agent: claude-sonnet-4-5}.")

    @property
    def monthly_budget_micro_usd(self) -> int:
        return int(self.monthly_budget_usd * 1_000_000)

    @property
    def per_build_cap_micro_usd(self) -> int:
        return int(self.per_build_cap_usd * 1_000_000)


class Price(Strict):
    """US dollars per million tokens."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal

    def cost_micro_usd(self, usage: Usage) -> int:
        """Micro-dollars for ``usage`` (1 USD per Mtok = 1 micro-dollar per token), rounded up."""
        total = (
            self.input * usage.input_tokens
            + self.output * usage.output_tokens
            + self.cache_write * usage.cache_creation_input_tokens
            + self.cache_read * usage.cache_read_input_tokens
        )
        return int(total.to_integral_value(rounding="ROUND_CEILING"))


class KilnConfig(Strict):
    tiers: dict[str, Tier]
    prices: dict[str, Price]

    def tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise KeyError(f"unknown tier {name!r}; known: {sorted(self.tiers)}") from None

    def price(self, model: str) -> Price:
        try:
            return self.prices[model]
        except KeyError:
            raise KeyError(f"no price for model {model!r}; add it to prices in kiln.yaml") from None


def load(path: str | Path | None = None) -> KilnConfig:
    source = Path(path or os.environ.get("KILN_CONFIG") or DEFAULT_PATH)
    return KilnConfig.model_validate(yaml.safe_load(source.read_text()))


@lru_cache(maxsize=1)
def default() -> KilnConfig:
    return load()
