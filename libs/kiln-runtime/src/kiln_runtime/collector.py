"""The garbage collector of a worker service: tuned for many builds held in memory, and timed.

CPython's cyclic collector runs a young collection every 700 new container objects (dicts,
lists, models) and a full one, which walks every tracked object with the event loop stopped,
whenever a quarter more objects than at the last one have survived two young ones. An agent
driving thousands of builds holds their turns and checkpoints, and every object a build keeps
alive through its model call (seconds) survives the young collections: full collections then
come often and each walks all the builds' state. ``tune`` raises the thresholds
(``KILN_GC_THRESHOLDS``, default ``10000,10,100``: young collections fourteen times rarer, a full
one considered only after a hundred middle ones), collects and freezes what exists once the
service has started (modules, settings, pools, clients) out of the collector's sight for good,
and times every collection: ``kiln_gc_pause_seconds{generation}`` is how long each stopped the
event loop (what it saved: docs/BENCHMARKS.md, concurrency).

Cyclic garbage that reaches the oldest generation waits longer for a full collection; most cycles
(an exception and its traceback, a finished task) die young and are collected as before.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from .metrics import GC_PAUSE

DEFAULT_THRESHOLDS = (10_000, 10, 100)

_started = 0.0


def _timed(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
    else:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _started)


def tune(thresholds: tuple[int, int, int] = DEFAULT_THRESHOLDS) -> None:
    """Set the thresholds, freeze what exists, and time each collection from now on (once)."""
    gc.set_threshold(*thresholds)
    gc.collect()
    gc.freeze()
    if _timed not in gc.callbacks:
        gc.callbacks.append(_timed)
