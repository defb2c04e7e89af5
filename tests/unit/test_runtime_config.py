from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from kiln_contracts import CacheCreation, Usage
from kiln_runtime.config import default, load
from kiln_runtime.retry import backoff_delay, retry

AT = datetime(2026, 12, 1, tzinfo=UTC)


def test_prices_in_micro_dollars_round_up():
    price = default().price("claude-sonnet-4-5", AT)
    usage = Usage(
        input_tokens=1000,
        output_tokens=100,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=5000,
    )
    # 1000*3 + 100*15 + 2000*3.75 (5-minute writes) + 5000*0.30 micro-dollars
    assert price.cost_micro_usd(usage) == 3000 + 1500 + 7500 + 1500
    assert default().price("claude-haiku-4-5").cost_micro_usd(Usage(cache_read_input_tokens=1)) == 1


def test_cache_writes_are_priced_by_their_ttl():
    split = Usage(
        cache_creation_input_tokens=3000,
        cache_creation=CacheCreation(
            ephemeral_5m_input_tokens=1000, ephemeral_1h_input_tokens=2000
        ),
    )
    # Sonnet 5.5: $2.50 per Mtok 5-minute writes, $4 per Mtok 1-hour writes
    assert default().cost("claude-sonnet-5-5", split, AT).micro_usd == 2500 + 8000


def test_a_price_holds_from_its_date():
    reads = Usage(cache_read_input_tokens=1_000_000)
    # Sonnet 5.5's cache reads: $0.20 per Mtok at launch, $0.10 from 2026-10-07
    before = datetime(2026, 10, 6, 23, 59, tzinfo=UTC)
    assert default().cost("claude-sonnet-5-5", reads, before).micro_usd == 200_000
    assert default().cost("claude-sonnet-5-5", reads, AT).micro_usd == 100_000


def test_a_band_by_prompt_length_prices_every_token_of_the_request():
    cfg = default()
    # Haiku 5.5: a prompt over 100k tokens (cache reads and writes included) pays the higher band
    at_limit = Usage(input_tokens=50_000, cache_read_input_tokens=50_000, output_tokens=1000)
    over = Usage(input_tokens=50_001, cache_read_input_tokens=50_000, output_tokens=1000)
    assert cfg.cost("claude-haiku-5-5", at_limit, AT).micro_usd == 5000 + 500 + 500
    assert cfg.cost("claude-haiku-5-5", over, AT).micro_usd == int(
        Decimal("25000.5") + 2500 + 2500 + 1
    )


def test_every_tier_model_and_dated_id_has_a_price():
    cfg = default()
    for tier in cfg.tiers.values():
        for model in tier.models.values():
            assert cfg.resolve(model) == model
    for dated, name in (
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ):
        assert cfg.resolve(dated) == name
        assert not cfg.cost(dated, Usage(input_tokens=1), AT).fallback


def test_unknown_tier_and_model_say_what_is_known():
    with pytest.raises(KeyError, match="known"):
        default().tier("platinum")
    with pytest.raises(KeyError, match="no entry for model"):
        default().price("gpt-0")
    cost = default().cost("gpt-0", Usage(output_tokens=1), AT)
    assert cost.fallback and cost.priced_as == default().fallback_model and cost.micro_usd > 0


def test_config_file_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "k.yaml"
    path.write_text(
        "tiers: {t: {monthly_budget_usd: 1, concurrent_builds: 2, per_build_cap_usd: 0.5,"
        " models: {agent: m}}}\nmodels: {m: {context_window: 1000, max_output_tokens: 100,"
        " thinking: none, prices: [{since: 2026-01-01, input: 1, output: 2, cache_write_5m: 1,"
        " cache_write_1h: 2, cache_read: 0.1}]}}\n"
    )
    monkeypatch.setenv("KILN_CONFIG", str(path))
    cfg = load()
    assert cfg.tier("t").per_build_cap_micro_usd == 500_000
    assert cfg.tier("t").models["agent"] == "m"
    assert cfg.fallback_model == "m"


def test_a_tier_naming_a_model_without_an_entry_is_refused(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text(
        "tiers: {t: {monthly_budget_usd: 1, concurrent_builds: 2, per_build_cap_usd: 0.5,"
        " models: {agent: nope}}}\nmodels: {m: {context_window: 1000, max_output_tokens: 100,"
        " thinking: none, prices: [{since: 2026-01-01, input: 1, output: 2, cache_write_5m: 1,"
        " cache_write_1h: 2, cache_read: 0.1}]}}\n"
    )
    with pytest.raises(ValueError, match="'nope' has no entry"):
        load(path)


def test_backoff_is_bounded_and_grows():
    assert all(0 <= backoff_delay(n, base=1, cap=4) <= 4 for n in range(1, 20))


async def test_retry_gives_up_after_attempts_and_honours_advice():
    calls = []

    async def flaky():
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await retry(flaky, attempts=3, retry_on=(ConnectionError,), delay_for=lambda e, n: 0.0)
    assert len(calls) == 3


async def test_retry_tells_of_each_retry_and_gives_up_at_once_when_told():
    told: list[int] = []
    errors = iter([ConnectionError("down"), ConnectionError("down"), ValueError("for good")])

    async def failing():
        raise next(errors)

    with pytest.raises(ValueError):
        await retry(
            failing,
            attempts=10,
            retry_on=(Exception,),
            delay_for=lambda e, n: 0.0,
            give_up=lambda e: isinstance(e, ValueError),
            on_retry=lambda e, n: told.append(n),
        )
    assert told == [1, 2]


def test_the_collector_is_tuned_frozen_and_timed() -> None:
    """A started service's collector: its thresholds set, what exists frozen out of its sight,
    and each collection's pause observed by generation."""
    import gc

    from kiln_runtime import collector
    from kiln_runtime.metrics import GC_PAUSE

    before = gc.get_threshold()

    def count(generation: str) -> float:
        for sample in GC_PAUSE.collect()[0].samples:
            if sample.name.endswith("_count") and sample.labels == {"generation": generation}:
                return sample.value
        return 0.0

    try:
        collector.tune((5_000, 7, 50))
        collector.tune((5_000, 7, 50))  # again: still one callback
        assert gc.get_threshold() == (5_000, 7, 50)
        assert gc.get_freeze_count() > 0
        assert gc.callbacks.count(collector._timed) == 1
        full = count("2")
        gc.collect()
        assert count("2") == full + 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        gc.callbacks.remove(collector._timed)


def test_the_collectors_thresholds_are_read_as_three_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kiln_runtime.settings import CommonSettings

    assert CommonSettings().gc_thresholds == (100_000, 10, 100)
    monkeypatch.setenv("KILN_GC_THRESHOLDS", "700, 10, 10")
    assert CommonSettings().gc_thresholds == (700, 10, 10)
    for bad in ("700,10", "700,ten,10", "0,10,10", "-1,10,10"):
        monkeypatch.setenv("KILN_GC_THRESHOLDS", bad)
        with pytest.raises(ValueError, match="three whole numbers"):
            CommonSettings()


def test_the_model_sdks_request_lines_are_quieted() -> None:
    """The anthropic SDK's HTTP client (httpx2) logs every request at INFO: a line per model
    call, for every build, is noise (and CPU); services show them only from WARNING."""
    import logging

    import httpx2._client

    from kiln_runtime.log import quiet_libraries

    sdk_logger = httpx2._client.logger
    before = sdk_logger.level
    try:
        quiet_libraries(logging.INFO)
        assert not sdk_logger.isEnabledFor(logging.INFO)
        assert sdk_logger.isEnabledFor(logging.WARNING)
    finally:
        sdk_logger.setLevel(before)
