"""Where the CLI finds the gateway and its keys: options, then the environment, then
``~/.config/kiln/config.toml`` (or $KILN_CONFIG_FILE), then the local development defaults.

```toml
url = "https://kiln.example.com"
api_key = "kiln_..."
admin_key = "..."   # only for `kiln keys`
```
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"


def config_path() -> Path:
    if explicit := os.environ.get("KILN_CONFIG_FILE"):
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "kiln" / "config.toml"


def load() -> dict[str, Any]:
    path = config_path()
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: {err}") from err


def resolve(option: str | None, key: str, default: str | None = None) -> str | None:
    """An option (already given by flag or environment) else the config file's ``key``."""
    if option:
        return option
    value = load().get(key)
    return str(value) if value else default
