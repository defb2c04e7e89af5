"""The entrypoint's start-up checks and the agent's config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kiln_agent import config
from kiln_agent.bootstrap import build
from kiln_agent.settings import AgentSettings, MissingApiKey
from kiln_contracts import QnA


def test_missing_api_key_fails_with_a_clear_message() -> None:
    with pytest.raises(MissingApiKey, match="ANTHROPIC_BASE_URL"):
        build(AgentSettings(anthropic_api_key=None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln_agent"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "ANTHROPIC_API_KEY is not set" in proc.stderr


def test_building_the_service_connects_nothing() -> None:
    service = build(AgentSettings(anthropic_api_key="k", nats_url="nats://127.0.0.1:1"))
    assert service.pool is None and service.model is None


def test_config_fills_the_prompt() -> None:
    cfg = config.load()
    system = cfg.system("Make a todo app", [QnA(question="Platform?", answer="Web")])
    assert "Make a todo app" in system and "Q: Platform?\nA: Web" in system
    assert "(none)" in cfg.system("x", [])
    assert "b42" in cfg.first_turn("b42")


def test_a_config_asking_more_than_a_call_without_streaming_may_is_refused(tmp_path) -> None:
    """The calls do not stream: max_tokens stays within the SDK's rule for such calls."""
    text = config.DEFAULT_PATH.read_text()
    assert config.load().max_tokens == config.NON_STREAMING_MAX_TOKENS
    for field, value in (("max_tokens", 21334), ("summary_max_tokens", 32000)):
        path = tmp_path / f"{field}.yaml"
        path.write_text(f"{text}\n{field}: {value}\n")
        with pytest.raises(ValueError, match=rf"{field}\n.*less than or equal to 21333"):
            config.load(path)
