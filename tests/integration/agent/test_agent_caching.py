"""Prompt caching measured over a 50-iteration scripted build through the SDK: each request starts
with the previous request up to its last cache breakpoint, byte for byte, and the scripted server,
which reports usage the way the API does, reads at least 90% of the input tokens from the cache."""

from __future__ import annotations

import pytest

from bench import caching as scripted_build

pytestmark = pytest.mark.integration


async def test_the_prefix_is_stable_and_most_input_is_read_from_the_cache() -> None:
    result = await scripted_build.run(iterations=50, parallel=2, output_chars=400)
    assert result.completed and result.requests == 50
    assert result.prefix_unchanged == 49 and result.changed_at == []
    assert result.read_ratio >= 0.9, result.line()


async def test_compaction_changes_the_prefix_only_when_it_happens() -> None:
    result = await scripted_build.run(iterations=50, parallel=2, output_chars=2500, window=40_000)
    assert result.completed and result.compactions >= 2
    assert len(result.changed_at) == result.compactions  # one cache miss per compaction
    assert result.read_ratio >= 0.8, result.line()
