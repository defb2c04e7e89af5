"""The budget's keys in Redis, and how long each is kept.

The budget service alone reads and writes these keys. They are a cache of the stream: a Redis
that has lost them (flushed, restarted empty) is rebuilt from the stream's events
(``recovery.py``), and until then charges and top-ups are refused (``SpendLost``).

Keys (all amounts integer micro-dollars):

* ``kiln:budget:intact``                           present while the keys hold everything since
                                                   the last rebuild (its value: when that ended)
* ``kiln:budget:rebuild:<token>``                  a rebuild under way (gone with a flush)
* ``kiln:charged:<event_id>``                      the event was charged (35-day TTL)
* ``kiln:spend:user:<user>:day:<YYYY-MM-DD>``      a user's spend on a UTC day (``p<n>`` when
                                                   periods are shortened, see ``periods.py``)
* ``kiln:spend:user:<user>:month:<YYYY-MM>``       a user's spend in a UTC month (or ``c<n>``)
* ``kiln:spend:build:<build_id>``                  a build's spend
* ``kiln:running:<user>``                          set of the user's running build ids
* ``kiln:ended:<build_id>``                        1 + the last run of the build that ended (keeps
                                                   a late BuildRequested out; ``1``: its first run)
* ``kiln:run:<build_id>``                          the build's current run (its last
                                                   BuildContinued's ``continuation``; absent: 0)
* ``kiln:tier:<user>``                             the tier of the user's latest BuildRequested

Sleep, wake and top-ups (see docs/ARCHITECTURE.md, budget):

* ``kiln:budget:topups:<user>``                    sorted set of top-ups: member ``<topup_id>:<micro>``,
                                                   score = Unix time of the top-up
* ``kiln:budget:topup:<user>:<topup_id>``          the top-up was credited (``credited``) and its
                                                   wakes sent (``woken``)
* ``kiln:budget:sleeping:<user>``                  set of the builds the budget put to sleep (a
                                                   top-up wakes these); left on BuildResumed or end
* ``kiln:budget:gen:<build_id>``                   the build's wake generation (its last BuildResumed)
* ``kiln:budget:slept:<build_id>:<period>``        the generation the budget slept the build in

The budget gates are not here: they live in the JetStream key-value bucket KILN_BUDGET_GATES
(``kiln_runtime.gates``), which the agent and the gateway read.
"""

from __future__ import annotations

DAY_S = 24 * 3600
CHARGED_TTL_S = 35 * DAY_S
DAY_TTL_S = 40 * DAY_S
MONTH_TTL_S = 400 * DAY_S
BUILD_TTL_S = 35 * DAY_S
ENDED_TTL_S = 35 * DAY_S

INTACT_KEY = "kiln:budget:intact"
REBUILD_TTL_S = DAY_S


def charged_key(event_id: object) -> str:
    return f"kiln:charged:{event_id}"


def day_key(user_id: str, period: str) -> str:
    return f"kiln:spend:user:{user_id}:day:{period}"


def month_key(user_id: str, cycle: str) -> str:
    return f"kiln:spend:user:{user_id}:month:{cycle}"


def build_key(build_id: str) -> str:
    return f"kiln:spend:build:{build_id}"


def running_key(user_id: str) -> str:
    return f"kiln:running:{user_id}"


def ended_key(build_id: str) -> str:
    return f"kiln:ended:{build_id}"


def run_key(build_id: str) -> str:
    return f"kiln:run:{build_id}"


def tier_key(user_id: str) -> str:
    return f"kiln:tier:{user_id}"


def topups_key(user_id: str) -> str:
    return f"kiln:budget:topups:{user_id}"


def sleeping_key(user_id: str) -> str:
    return f"kiln:budget:sleeping:{user_id}"


def generation_key(build_id: str) -> str:
    return f"kiln:budget:gen:{build_id}"


def slept_key(build_id: str, period: str) -> str:
    return f"kiln:budget:slept:{build_id}:{period}"


def topup_key(user_id: str, topup_id: str) -> str:
    return f"kiln:budget:topup:{user_id}:{topup_id}"


def rebuild_key(token: str) -> str:
    return f"kiln:budget:rebuild:{token}"


def topup_member(topup_id: str, amount_micro_usd: int) -> str:
    """A top-up's member in ``kiln:budget:topups:<user>`` (ids must not contain ':')."""
    if not topup_id or ":" in topup_id:
        raise ValueError(f"invalid top-up id {topup_id!r}: non-empty, without ':'")
    if amount_micro_usd <= 0:
        raise ValueError(f"a top-up is positive, not {amount_micro_usd}")
    return f"{topup_id}:{amount_micro_usd}"
