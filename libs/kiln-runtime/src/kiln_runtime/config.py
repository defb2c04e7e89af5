"""Tiers and models: data, not code (kiln.yaml beside this module, or KILN_CONFIG).

A model is one entry: what it can do (context window, output limit, thinking, effort) and its
prices, each price in force from a date. The Messages API answers with the id of the snapshot
that served a request (``claude-sonnet-4-5`` is answered as ``claude-sonnet-4-5-20250929``): an
entry covers its name, the ids it lists and any ``<name>-YYYYMMDD``. An id no entry covers is
priced at the ``unpriced_fallback`` model (default: the most expensive one), never free.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln_contracts import Usage

DEFAULT_PATH = Path(__file__).with_name("kiln.yaml")
DATED = re.compile(r"^(?P<name>.+)-(?P<date>\d{8})$")

Effort = Literal["low", "medium", "high", "xhigh", "max"]
Thinking = Literal["adaptive", "always", "extended", "none"]


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tier(Strict):
    monthly_budget_usd: Decimal = Field(ge=0)
    concurrent_builds: int = Field(ge=1)
    per_build_cap_usd: Decimal = Field(ge=0)
    models: dict[str, str] = Field(description="Model per role, e.g. {agent: claude-sonnet-5-5}.")
    effort: dict[str, Effort] = Field(
        default_factory=dict,
        description="output_config.effort per role, for models that take it (else their default).",
    )

    @property
    def monthly_budget_micro_usd(self) -> int:
        return int(self.monthly_budget_usd * 1_000_000)

    @property
    def per_build_cap_micro_usd(self) -> int:
        return int(self.per_build_cap_usd * 1_000_000)


class Rates(Strict):
    """US dollars per million tokens (= micro-dollars per token)."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_write_5m: Decimal = Field(ge=0, description="Cache writes with the 5-minute TTL.")
    cache_write_1h: Decimal = Field(ge=0, description="Cache writes with the 1-hour TTL.")
    cache_read: Decimal = Field(ge=0)

    def cost_micro_usd(self, usage: Usage) -> int:
        """Micro-dollars for ``usage``, rounded up once over the sum. Cache writes are split by
        TTL as the API reports them (``cache_creation``); without the split, all at 5 minutes."""
        split = usage.cache_creation
        one_hour = (
            min(split.ephemeral_1h_input_tokens, usage.cache_creation_input_tokens) if split else 0
        )
        five_min = usage.cache_creation_input_tokens - one_hour
        total = (
            self.input * usage.input_tokens
            + self.output * usage.output_tokens
            + self.cache_write_5m * five_min
            + self.cache_write_1h * one_hour
            + self.cache_read * usage.cache_read_input_tokens
        )
        return int(total.to_integral_value(rounding="ROUND_CEILING"))


class Band(Rates):
    """Rates for a request whose prompt (input + cache reads + cache writes) is over
    ``prompt_over`` tokens: every token of that request pays them, output included."""

    prompt_over: int = Field(ge=0)


class Price(Rates):
    """The rates in force from ``since`` (UTC midnight) until the next price of the model."""

    since: date
    bands: list[Band] = Field(default_factory=list, description="Higher rates by prompt length.")

    def rates(self, usage: Usage) -> Rates:
        prompt = (
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )
        over = [b for b in self.bands if prompt > b.prompt_over]
        return max(over, key=lambda b: b.prompt_over) if over else self

    def cost_micro_usd(self, usage: Usage) -> int:
        return Rates.cost_micro_usd(self.rates(usage), usage)


class ModelSpec(Strict):
    ids: list[str] = Field(
        default_factory=list, description="Snapshot ids this entry covers beyond its name."
    )
    context_window: int = Field(ge=1, description="Tokens of input + output per request.")
    max_output_tokens: int = Field(ge=1)
    thinking: Thinking = Field(
        description="adaptive: on by default, off with between_tools; always: cannot be turned "
        "off; extended: only with a token budget (Kiln sends none: off); none: no thinking."
    )
    effort: bool = Field(default=False, description="Takes output_config.effort.")
    prices: list[Price] = Field(min_length=1, description="Each in force from its date.")

    @model_validator(mode="after")
    def _prices_in_order(self) -> ModelSpec:
        days = [p.since for p in self.prices]
        if days != sorted(days) or len(set(days)) != len(days):
            raise ValueError("prices must be in order of `since`, one per date")
        return self

    def price_at(self, at: datetime) -> Price:
        """The price in force at ``at`` (the first one for a time before every price)."""
        day = (at.astimezone(UTC) if at.tzinfo else at).date()
        current = self.prices[0]
        for price in self.prices:
            if price.since <= day:
                current = price
        return current


@dataclass(frozen=True)
class Cost:
    micro_usd: int
    priced_as: str  # the entry whose price was used
    fallback: bool  # the model had no entry: priced at the fallback


class KilnConfig(Strict):
    tiers: dict[str, Tier]
    models: dict[str, ModelSpec]
    unpriced_fallback: str | None = Field(
        default=None,
        description="The model whose prices an unknown model id pays (default: the most "
        "expensive model, by output then input rate, as priced today).",
    )

    @model_validator(mode="after")
    def _references_exist(self) -> KilnConfig:
        for name, tier in self.tiers.items():
            for role, model in tier.models.items():
                if self.resolve(model) is None:
                    raise ValueError(f"tier {name!r} {role} model {model!r} has no entry in models")
        if self.unpriced_fallback is not None and self.unpriced_fallback not in self.models:
            raise ValueError(f"unpriced_fallback {self.unpriced_fallback!r} is not a model")
        if not self.models:
            raise ValueError("models must name at least one model")
        return self

    def tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise KeyError(f"unknown tier {name!r}; known: {sorted(self.tiers)}") from None

    @cached_property
    def _by_id(self) -> dict[str, str]:
        out = {name: name for name in self.models}
        for name, spec in self.models.items():
            out.update({i: name for i in spec.ids})
        return out

    def resolve(self, model_id: str) -> str | None:
        """The entry that covers ``model_id`` (its name, a listed id, or ``<name>-YYYYMMDD``)."""
        if model_id in self._by_id:
            return self._by_id[model_id]
        dated = DATED.match(model_id)
        if dated and dated["name"] in self._by_id:
            return self._by_id[dated["name"]]
        return None

    def spec(self, model_id: str) -> ModelSpec:
        name = self.resolve(model_id)
        if name is None:
            raise KeyError(f"no entry for model {model_id!r}; add it to models in kiln.yaml")
        return self.models[name]

    def price(self, model_id: str, at: datetime | None = None) -> Price:
        """The model's price in force at ``at`` (now if not given); KeyError if it has none."""
        return self.spec(model_id).price_at(at or datetime.now(UTC))

    @cached_property
    def fallback_model(self) -> str:
        if self.unpriced_fallback is not None:
            return self.unpriced_fallback

        def dearness(name: str) -> tuple[Decimal, Decimal]:
            price = self.models[name].prices[-1]
            return (price.output, price.input)

        return max(self.models, key=dearness)

    def cost(self, model_id: str, usage: Usage, at: datetime) -> Cost:
        """What an iteration of ``model_id`` with ``usage`` made at ``at`` costs: at its own
        price, or at the fallback's if no entry covers the id."""
        name = self.resolve(model_id)
        fallback = name is None
        if name is None:
            name = self.fallback_model
        return Cost(self.models[name].price_at(at).cost_micro_usd(usage), name, fallback)


def load(path: str | Path | None = None) -> KilnConfig:
    source = Path(path or os.environ.get("KILN_CONFIG") or DEFAULT_PATH)
    return KilnConfig.model_validate(yaml.safe_load(source.read_text()))


@lru_cache(maxsize=1)
def default() -> KilnConfig:
    return load()
