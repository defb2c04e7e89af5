"""The embedded S3 server: moto's, with its objects kept on disk across restarts.

moto (5.x) keeps everything in memory and has no persistence of its own, and the file-backed
S3 servers on PyPI are young and miss parts of the API Kiln uses (presigned URLs, ListObjectsV2
pages). So this is moto's WSGI application behind a journal: every mutating request that moto
answered with a 2xx (PUT, POST, DELETE) is written to ``<dir>/<n>.req`` (method, path, query,
headers) and ``<dir>/<n>.body`` before the answer goes out, and at start-up the journal is
replayed into the fresh moto in order. Replaying is compacting: an object put that a later put
or delete of the same key superseded, and a delete that is then left with nothing to delete,
are removed. Run as ``python -m kiln_devstack.s3_server --port P --data-dir D``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple
from werkzeug.test import create_environ, run_wsgi_app

log = logging.getLogger(__name__)

MUTATING = {"PUT", "POST", "DELETE"}
KEPT = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH")
RAW = ("REQUEST_URI", "RAW_URI")  # the dev server's; moto reads the path from them

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _object_path(record: dict[str, Any]) -> str | None:
    """``/bucket/key`` for a plain object PUT or DELETE (no query: not a part, not an ACL)."""
    path = str(record["PATH_INFO"])
    if record.get("QUERY_STRING") or path.count("/") < 2 or path.endswith("/"):
        return None
    return path if record["REQUEST_METHOD"] in ("PUT", "DELETE") else None


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.next = 1 + max((int(p.stem) for p in self.dir.glob("*.req")), default=0)

    def numbers(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.req"))

    def read(self, n: int) -> tuple[dict[str, Any], bytes]:
        record = json.loads((self.dir / f"{n}.req").read_text())
        body = (self.dir / f"{n}.body").read_bytes()
        return record, body

    def append(self, record: dict[str, Any], body: bytes) -> None:
        with self.lock:
            n = self.next
            self.next += 1
            (self.dir / f"{n}.body").write_bytes(body)
            tmp = self.dir / f"{n}.req.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.dir / f"{n}.req")  # the record exists once it is whole

    def drop(self, n: int) -> None:
        for suffix in (".req", ".body"):
            (self.dir / f"{n}{suffix}").unlink(missing_ok=True)

    def compact(self) -> int:
        """Drop the object puts superseded by a later put or delete of the same key, then the
        deletes that have nothing left before them. Returns how many records were dropped."""
        records = [(n, self.read(n)[0]) for n in self.numbers()]
        latest: dict[str, int] = {}
        other = set()  # paths that other requests wrote (a multipart upload's completion)
        for n, record in records:
            if path := _object_path(record):
                latest[path] = n
            else:
                other.add(str(record["PATH_INFO"]))
        dropped = 0
        for n, record in records:
            path = _object_path(record)
            if path is None:
                continue
            superseded = latest[path] != n
            a_lone_delete = record["REQUEST_METHOD"] == "DELETE" and path not in other
            if superseded or a_lone_delete:
                self.drop(n)
                dropped += 1
        return dropped


class Persistent:
    """WSGI middleware: journal each successful mutating request before answering it."""

    def __init__(self, app: WsgiApp, journal: Journal) -> None:
        self.app = app
        self.journal = journal

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["REQUEST_METHOD"] not in MUTATING:
            return self.app(environ, start_response)
        length = environ.get("CONTENT_LENGTH")
        if length:
            body = environ["wsgi.input"].read(int(length))
        elif environ.get("wsgi.input_terminated"):  # chunked: the server ends the stream
            body = environ["wsgi.input"].read()
        else:
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)
        app_iter, status, headers = run_wsgi_app(self.app, environ, buffered=True)
        if str(status).startswith("2"):
            record = {k: environ[k] for k in (*KEPT, *RAW) if k in environ}
            record |= {k: v for k, v in environ.items() if k.startswith("HTTP_")}
            self.journal.append(record, body)
        start_response(status, list(headers))
        return app_iter

    def replay(self) -> int:
        dropped = self.journal.compact()
        replayed = failed = 0
        for n in self.journal.numbers():
            record, body = self.journal.read(n)
            environ = create_environ()
            environ.update({k: v for k, v in record.items() if isinstance(v, str)})
            query = record.get("QUERY_STRING")
            uri = str(record["PATH_INFO"]) + (f"?{query}" if query else "")
            for key in RAW:
                environ[key] = record.get(key, uri)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            _, status, _ = run_wsgi_app(self.app, environ, buffered=True)
            if str(status).startswith("2"):
                replayed += 1
            else:
                failed += 1
                log.warning("journal record %d did not replay: %s", n, status)
        log.info("replayed %d request(s) (%d failed, %d compacted)", replayed, failed, dropped)
        return replayed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    moto_app = DomainDispatcherApplication(create_backend_app)
    app = Persistent(moto_app, Journal(args.data_dir))
    app.replay()  # before the port is bound: nothing is served from a half-restored store
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
