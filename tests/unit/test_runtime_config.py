from __future__ import annotations

import pytest

from kiln_contracts import Usage
from kiln_runtime.config import default, load
from kiln_runtime.retry import backoff_delay, retry


def test_prices_in_micro_dollars_round_up():
    price = default().price("claude-sonnet-4-5")
    usage = Usage(
        input_tokens=1000,
        output_tokens=100,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=5000,
    )
    # 1000*3 + 100*15 + 2000*3.75 + 5000*0.30 micro-dollars
    assert price.cost_micro_usd(usage) == 3000 + 1500 + 7500 + 1500
    assert default().price("claude-haiku-4-5").cost_micro_usd(Usage(cache_read_input_tokens=1)) == 1


def test_unknown_tier_and_model_say_what_is_known():
    with pytest.raises(KeyError, match="known"):
        default().tier("platinum")
    with pytest.raises(KeyError, match="no price"):
        default().price("gpt-0")


def test_config_file_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "k.yaml"
    path.write_text(
        "tiers: {t: {monthly_budget_usd: 1, concurrent_builds: 2, per_build_cap_usd: 0.5,"
        " models: {agent: m}}}\nprices: {m: {input: 1, output: 2, cache_write: 1, cache_read: 0.1}}\n"
    )
    monkeypatch.setenv("KILN_CONFIG", str(path))
    cfg = load()
    assert cfg.tier("t").per_build_cap_micro_usd == 500_000
    assert cfg.tier("t").models["agent"] == "m"


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


def test_start_up_objects_are_frozen_out_of_collection() -> None:
    import gc

    from kiln_runtime.service import freeze_start_up_objects

    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


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
