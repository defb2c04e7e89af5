"""A long build with large writes: 200 iterations of a scripted build whose every turn writes a
file of several thousand characters, by the real agent in-process, through the anthropic SDK
against the scripted server (which refuses a prompt longer than the window, as the API does),
with the model's context window set for both. The file contents the model sends stay in the
conversation unless compaction clears them, and clearing alone is not enough: the oldest turns
are summarised too.

    uv run --frozen python bench/long_build.py [--iterations 200] [--write-chars 6000]
        [--window 100000] [--parallel 1] [--output-chars 300]

Ends with ``long_build requests=… completed=… read_ratio=… compactions=… summaries=…``:
read_ratio = cache_read_input_tokens / (input + cache writes + cache reads) over every call,
summarising ones included; compactions = the requests at which compaction changed what is sent;
summaries = the summarising calls made, summary_charged = those charged (IterationCompleted of
purpose summary).
"""

from __future__ import annotations

import argparse
import asyncio

import caching as scripted_build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--write-chars", type=int, default=6000, help="Each turn's file.")
    parser.add_argument("--window", type=int, default=100_000, help="Context window (tokens).")
    parser.add_argument("--parallel", type=int, default=1, help="bash calls per turn.")
    parser.add_argument("--output-chars", type=int, default=300, help="Output of each call.")
    args = parser.parse_args()
    r = asyncio.run(
        scripted_build.run(
            args.iterations, args.parallel, args.output_chars, args.window, args.write_chars
        )
    )
    if r.changed_at:
        print(f"prefix changed at requests {r.changed_at}")
    print(
        f"long_build requests={r.requests} completed={str(r.completed).lower()} "
        f"input={r.input_tokens} cache_write={r.cache_write} cache_read={r.cache_read} "
        f"read_ratio={r.read_ratio:.3f} compactions={r.compactions} summaries={r.summaries} "
        f"summary_charged={r.summary_charged} prefix_unchanged={r.prefix_unchanged}/"
        f"{max(0, r.requests - 1)} failed={r.failed.split(':')[0] or 'none'}"
    )
    if not r.completed:
        raise SystemExit(f"the long build did not complete: {r.failed}")


if __name__ == "__main__":
    main()
