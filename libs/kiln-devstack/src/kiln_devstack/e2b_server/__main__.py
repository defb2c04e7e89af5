"""``python -m kiln_devstack.e2b_server --base DIR [--host H] [--port P]``: the server as a
process (the local stack's); prints its URL, stops at SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal

from .server import E2BServer


def main() -> None:  # pragma: no cover - the process the local stack runs
    parser = argparse.ArgumentParser(description="A local E2B-compatible server")
    parser.add_argument("--base", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def run() -> None:
        server = E2BServer(args.base, host=args.host, port=args.port)
        url = await server.start()
        print(url, "namespaces" if server.namespaces else "no namespaces", flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            await server.stop()  # every sandbox (and its namespace) ends with the server

    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover - run as a process by the local stack, like main()
    main()
