"""Prompt caching over a 50-iteration scripted build, through the anthropic SDK against the scripted
server (which reports usage the way the API does: 1024-token minimum, 20-block lookback).

    uv run --frozen python bench/prompt_caching.py [--iterations 50] [--parallel 2]
        [--output-chars 400] [--window TOKENS]

Prints one line per run; the last reads ``prompt_caching requests=… read_ratio=…``.
"""

from __future__ import annotations

import argparse
import asyncio

import caching as scripted_build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2, help="Tool calls per turn.")
    parser.add_argument("--output-chars", type=int, default=400, help="Output of each tool call.")
    parser.add_argument("--window", type=int, default=None, help="Override the context window.")
    args = parser.parse_args()
    result = asyncio.run(
        scripted_build.run(args.iterations, args.parallel, args.output_chars, args.window)
    )
    if not result.completed:
        raise SystemExit("the scripted build did not complete")
    if result.changed_at:
        print(f"prefix changed at requests {result.changed_at} (compactions)")
    print(result.line())


if __name__ == "__main__":
    main()
