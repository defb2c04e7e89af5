"""The garbage collector of a worker service: tuned for many builds held in memory, and timed.

CPython's cyclic collector runs a young collection once the container objects (dicts, lists,
models, coroutines) allocated since the last one outnumber those freed by 700, a middle one
every ten young ones, and a full one, which walks every tracked object with the event loop
stopped, whenever a quarter more objects than at the last one have survived two young ones. An
agent driving thousands of builds frees about as many objects as it allocates, so each young
collection walks whatever was allocated since the last one and is still alive: above all what
each build keeps alive through its model call (its handler's coroutines, its request), for
seconds. The rarer the young collections, the more of that has died before one comes. ``tune``
raises the thresholds (``KILN_GC_THRESHOLDS``, default ``100000,10,100``: young collections
about 140 times rarer, a full one considered only after a hundred middle ones), collects and
freezes what exists once the service has started (modules, settings, pools, clients) out of the
collector's sight for good, and times every collection: ``kiln_gc_pause_seconds{generation}`` is
how long each stopped the event loop (what it saved: docs/BENCHMARKS.md, concurrency).

Cyclic garbage waits longer to be collected (an exception and its traceback, a finished task):
memory grows a little for it.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from .metrics import GC_PAUSE

DEFAULT_THRESHOLDS = (100_000, 10, 100)

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
