"""A TCP forwarder in front of a dependency (Postgres, Redis, an S3 API) that can be taken down
and brought back, as an outage looks from the services: while it is down, connections are
refused and the open ones are reset; once it is back, new connections reach the dependency
again. It runs its own event loop in a thread, so synchronous tests can drive it.

    with Forwarder("127.0.0.1", 5432) as pg:
        url = f"postgresql://127.0.0.1:{pg.port}/kiln"   # give this to the services
        pg.down()
        ...
        pg.up()

``forwarded(url)`` starts one in front of a URL's server and gives the URL through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from urllib.parse import parse_qs, urlsplit, urlunsplit

from .host import free_port


class Forwarder:
    def __init__(
        self,
        host: str = "",
        port: int = 0,
        *,
        unix: str | None = None,
        listen_port: int | None = None,
    ) -> None:
        """To ``host:port``, or to the Unix socket ``unix`` (an embedded Postgres's)."""
        self.target = (host, port)
        self.unix = unix
        self.port = listen_port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.connections = 0  # accepted since the start: a check that traffic went through

    def __enter__(self) -> Forwarder:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self.up()

    def stop(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def up(self) -> None:
        """Listen again (idempotent)."""
        self._call(self._listen())

    def down(self) -> None:
        """Refuse new connections and reset the open ones (idempotent)."""
        self._call(self._cut())

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._pipe, "127.0.0.1", self.port, reuse_address=True
            )

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()
        if server is not None:
            await server.wait_closed()

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.unix is not None:
                server_r, server_w = await asyncio.open_unix_connection(self.unix)
            else:
                server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._open |= {client_w, server_w}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        try:
            await asyncio.gather(copy(client_r, server_w), copy(server_r, client_w))
        finally:
            self._open -= {client_w, server_w}


def forwarded(url: str) -> tuple[Forwarder, str]:
    """A started forwarder to the server of ``url`` (TCP, or the Unix socket of an embedded
    Postgres: ``?host=<dir>``) and the URL through it."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.hostname is None and "host" in query:
        forwarder = Forwarder(unix=f"{query['host'][0]}/.s.PGSQL.{parts.port or 5432}")
        parts = parts._replace(query="")
    else:
        if not (parts.hostname and parts.port):
            raise ValueError(f"no host and port in {url!r}")
        forwarder = Forwarder(parts.hostname, parts.port)
    forwarder.start()
    user, _, _ = parts.netloc.rpartition("@")
    host = f"127.0.0.1:{forwarder.port}"
    return forwarder, urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))
