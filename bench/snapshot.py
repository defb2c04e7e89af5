"""Kiln's incremental snapshot vs a full ``tar czf`` + upload at every checkpoint.

A 2,000-file, ~50 MB workspace (half the files random bytes, half text), checkpointed once, then
``--rounds`` times with one file changed. Kiln: the real snapshot service (in-process wiring:
CheckpointSaved on JetStream -> manifest and upload requests over NATS -> S3) and the sandbox
service's real manifest/upload handlers on the ``local`` provider, against moto's S3 server
started here; timed from publishing CheckpointSaved to receiving SnapshotSaved. Naive: ``tar czf``
of the whole workspace and a PUT of the archive to the same S3, at each of the same checkpoints.

Ends with ``snapshot time_ratio=… bytes_ratio=…`` (incremental ÷ full, medians over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path

import aioboto3
from _common import bench, connect, figures

from kiln_contracts import CheckpointSaved, SnapshotSaved, subjects
from kiln_contracts.rpc import ManifestRequest, UploadRequest
from kiln_devstack.sandbox import MemoryRegistry
from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.handlers import SandboxService
from kiln_sandbox.records import SandboxRecord
from kiln_snapshot import bootstrap
from kiln_snapshot.settings import SnapshotSettings

BUILD = "bench-snapshot"


def make_tree(root: Path, files: int, total_mb: float, seed: int = 7) -> int:
    rng = random.Random(seed)
    mean = int(total_mb * 1024 * 1024 / files)
    words = [f"word{i}" for i in range(500)]
    total = 0
    for i in range(files):
        size = max(1, int(rng.uniform(0.2, 1.8) * mean))
        path = root / f"pkg{i % 40:02d}" / f"sub{i % 7}" / f"file{i:04d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 2:
            data = rng.randbytes(size)
        else:
            text = " ".join(rng.choice(words) for _ in range(size // 6 + 1))
            data = text.encode()[:size]
        path.write_bytes(data)
        total += len(data)
    return total


async def main(files: int, total_mb: float, rounds: int) -> None:
    with bench("snapshot") as b:
        s3_url = os.environ.get("S3_ENDPOINT_URL") or b.infra.start_s3()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "kiln-bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kiln-bench")
        bucket = f"kiln-bench-{int(time.time())}"
        provider = LocalProvider(b.data_dir / "sandboxes")
        registry = MemoryRegistry()
        sandbox_svc = SandboxService(provider, registry, None, None)  # type: ignore[arg-type]
        sandbox = await provider.create(BUILD)
        await registry.put(SandboxRecord(BUILD, "local", sandbox.sandbox_id, "running"))
        ws = Path(sandbox.root)
        size = make_tree(ws, files, total_mb)
        print(f"workspace: {files} files, {size / 1e6:.1f} MB")

        nc = await connect(b.urls["NATS_URL"])

        async def manifest(msg: object) -> None:
            reply = await sandbox_svc.manifest(ManifestRequest.model_validate_json(msg.data))  # type: ignore[attr-defined]
            await msg.respond(reply.model_dump_json().encode())  # type: ignore[attr-defined]

        async def upload(msg: object) -> None:
            reply = await sandbox_svc.upload(UploadRequest.model_validate_json(msg.data))  # type: ignore[attr-defined]
            await msg.respond(reply.model_dump_json().encode())  # type: ignore[attr-defined]

        await nc.subscribe(subjects.SANDBOX_MANIFEST, cb=manifest)
        await nc.subscribe(subjects.SANDBOX_UPLOAD, cb=upload)

        settings = SnapshotSettings(
            nats_url=b.urls["NATS_URL"], s3_endpoint_url=s3_url, s3_bucket=bucket
        )
        wiring = bootstrap.build(settings)
        await wiring.bus.connect()
        await wiring.start()
        await wiring.bus.start()
        saved: asyncio.Queue[SnapshotSaved] = asyncio.Queue()

        async def on_saved(msg: object) -> None:
            await saved.put(SnapshotSaved.model_validate_json(msg.data))  # type: ignore[attr-defined]

        await nc.subscribe(subjects.subject(BUILD, SnapshotSaved.kind), cb=on_saved)

        async def kiln_snapshot(iteration: int) -> tuple[float, SnapshotSaved]:
            event = CheckpointSaved(
                build_id=BUILD, user_id="bench", iteration=iteration, reason="periodic"
            )
            started = time.perf_counter()
            await wiring.bus.publish(event)
            result = await asyncio.wait_for(saved.get(), timeout=600)
            return time.perf_counter() - started, result

        session = aioboto3.Session()
        archive = b.data_dir / "workspace.tar.gz"

        async def naive(iteration: int) -> tuple[float, int]:
            started = time.perf_counter()
            tar = await asyncio.create_subprocess_exec(
                "tar", "czf", str(archive), "-C", str(ws), "."
            )
            if await tar.wait() != 0:
                raise SystemExit("tar czf failed")
            async with session.client("s3", endpoint_url=s3_url, region_name="us-east-1") as s3:
                await s3.put_object(
                    Bucket=bucket,
                    Key=f"naive/{BUILD}/{iteration}.tar.gz",
                    Body=archive.read_bytes(),
                )
            return time.perf_counter() - started, archive.stat().st_size

        try:
            first_t, first = await kiln_snapshot(1)
            first_naive_t, first_naive_b = await naive(1)
            print(
                f"first checkpoint: kiln {first_t:.2f} s, {first.bytes_uploaded / 1e6:.1f} MB "
                f"uploaded; tar czf + upload {first_naive_t:.2f} s, {first_naive_b / 1e6:.1f} MB"
            )
            rng = random.Random(11)
            all_files = sorted(
                p for p in await asyncio.to_thread(lambda: list(ws.rglob("*"))) if p.is_file()
            )
            k_times, k_bytes, n_times, n_bytes = [], [], [], []
            for r in range(rounds):
                changed = rng.choice(all_files)
                changed.write_bytes(changed.read_bytes() + f"\nedit {r}\n".encode())
                t, ev = await kiln_snapshot(r + 2)
                nt, nb = await naive(r + 2)
                k_times.append(t)
                k_bytes.append(ev.bytes_uploaded)
                n_times.append(nt)
                n_bytes.append(nb)
                print(
                    f"round {r + 1}: one file changed ({changed.stat().st_size} bytes): "
                    f"kiln {t * 1000:.0f} ms, {ev.bytes_uploaded} bytes uploaded "
                    f"({ev.files} files, {ev.bytes_total / 1e6:.1f} MB in the snapshot); "
                    f"tar czf + upload {nt * 1000:.0f} ms, {nb / 1e6:.1f} MB"
                )
        finally:
            await wiring.bus.stop()
            await wiring.stop()
            await nc.close()
            await provider.close()

        kt, kb = statistics.median(k_times), statistics.median(k_bytes)
        nt_, nb_ = statistics.median(n_times), statistics.median(n_bytes)
        print(
            f"median over {rounds} rounds: kiln {kt * 1000:.0f} ms / {kb:.0f} bytes; "
            f"full {nt_ * 1000:.0f} ms / {nb_:.0f} bytes"
        )
        print(
            figures(
                "snapshot",
                time_ratio=round(kt / nt_, 4),
                bytes_ratio=float(f"{kb / nb_:.2e}"),
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.files, args.mb, args.rounds))
