"""What a replica keeps in memory of the builds it is running, so that an iteration reads nothing:
per build, the turns it has read or saved (committed turns never change) and the checkpoint its
last handler of the build was done with. Least recently used builds are dropped past a limit in
JSON characters and a limit in builds; a sleeping or finished build is dropped at once.

A kept checkpoint is handed out once (``recall``: the handler mutates it). It may be out of date
(another replica moved the build on): the driver's save checks its version, and a "nothing to do"
decided on it is confirmed on a fresh read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .checkpoint import Checkpoint, Turn


@dataclass
class Entry:
    """One build: its turns (seq 0 … n-1), their size in JSON characters, its checkpoint, and the
    newest version of the checkpoint saved or kept here."""

    turns: list[Turn] = field(default_factory=list)
    turn_chars: int = 0
    checkpoint: Checkpoint | None = None
    version: int = 0

    @property
    def size(self) -> int:
        """What it counts towards the character limit: the turns, and the kept checkpoint's
        system prompt (the rest of a checkpoint is small)."""
        return self.turn_chars + (len(self.checkpoint.system) if self.checkpoint else 0)


class Kept:
    def __init__(self, max_chars: int, max_builds: int) -> None:
        self.max_chars = max_chars
        self.max_builds = max_builds
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.chars = 0  # the sum of the entries' sizes

    def keep(self, build_id: str, entry: Entry, new: list[Turn] | None = None) -> None:
        """Keep a build's entry (not kept now: ``forget`` it first), ``new`` turns appended, as
        the most recently used, if it fits; drop the least recently used beyond the limits."""
        for turn in new or ():
            entry.turns.append(turn)
            entry.turn_chars += len(turn.content_json)
        if entry.size > self.max_chars or self.max_builds < 1:
            return
        self.entries[build_id] = entry
        self.chars += entry.size
        while self.chars > self.max_chars or len(self.entries) > self.max_builds:
            _, evicted = self.entries.popitem(last=False)
            self.chars -= evicted.size

    def forget(self, build_id: str) -> Entry | None:
        entry = self.entries.pop(build_id, None)
        if entry is not None:
            self.chars -= entry.size
        return entry

    def remember(self, cp: Checkpoint) -> None:
        """Keep the checkpoint a handler is done with for the build's next message, if the
        build's turns are kept (never one older than a version saved or kept here since)."""
        entry = self.forget(cp.build_id)
        if entry is not None:
            if cp.version >= entry.version:
                cp.lease, entry.checkpoint, entry.version = None, cp, cp.version
            self.keep(cp.build_id, entry)

    def recall(self, build_id: str) -> Checkpoint | None:
        """The checkpoint kept for the build, handed out once (a handler mutates it)."""
        found = self.entries.get(build_id)
        if found is None or found.checkpoint is None:
            return None
        entry = self.forget(build_id)
        assert entry is not None and entry.checkpoint is not None
        cp, entry.checkpoint = entry.checkpoint, None
        self.keep(build_id, entry)
        return cp

    def saved(self, cp: Checkpoint, new_turns: list[Turn]) -> None:
        """Add the turns a save appended to the build's kept turns, if they follow on."""
        found = self.entries.get(cp.build_id)
        if found is not None:
            found.version = max(found.version, cp.version)
        entry = self.forget(cp.build_id) if new_turns else None
        if entry is None:
            return
        if len(entry.turns) + len(new_turns) == cp.turns:
            self.keep(cp.build_id, entry, new_turns)
        elif len(entry.turns) + len(new_turns) < cp.turns:
            # another replica saved turns in between: the next think reads from the gap
            self.keep(cp.build_id, entry)
        # else out of step: forgotten, read afresh next time
