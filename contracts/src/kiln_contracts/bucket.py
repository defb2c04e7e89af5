"""The snapshot bucket's key layout, in one place: the snapshot service writes it, the gateway
(files archive) and the CLI read it, and no one spells a key anywhere else.

* ``blobs/<sha256>``                                  a regular file's bytes, shared by every build
* ``builds/<build_id>/manifests/<snapshot_id>.json``  one snapshot (``kiln_contracts.manifest``)
* ``builds/<build_id>/latest``                        text: the newest snapshot's id
* ``builds/<build_id>/forks/<snapshot_id>/<fork_id>``  empty: a fork made from that snapshot
                                                      (retention keeps the manifest)
* ``builds/<build_id>/pruned``                        text: the highest iteration of a manifest
                                                      retention deleted (older ones may be gone)
* ``pending/<build_id>/<snapshot_id>.json``           a snapshot being written (the snapshot
                                                      service's garbage-collection protocol)
* ``gc/running/<run_id>``                             a garbage collection that is sweeping

Build ids are ``Id``s and snapshot ids UUIDs: neither holds a '/', so a key parses back.
"""

from __future__ import annotations

from typing import Final

BLOBS_PREFIX: Final = "blobs/"
BUILDS_PREFIX: Final = "builds/"
PENDING_PREFIX: Final = "pending/"
GC_RUNNING_PREFIX: Final = "gc/running/"

_MANIFESTS: Final = "manifests"
_JSON: Final = ".json"


def blob_key(sha256: str) -> str:
    return f"{BLOBS_PREFIX}{sha256}"


def blob_sha256(key: str) -> str | None:
    """The sha256 a blob key names; None for a key outside ``blobs/``."""
    return key.removeprefix(BLOBS_PREFIX) if key.startswith(BLOBS_PREFIX) else None


def manifests_prefix(build_id: str) -> str:
    """The prefix of every manifest of a build."""
    return f"{BUILDS_PREFIX}{build_id}/{_MANIFESTS}/"


def manifest_key(build_id: str, snapshot_id: str) -> str:
    return f"{manifests_prefix(build_id)}{snapshot_id}{_JSON}"


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """(build id, snapshot id) of a manifest key; None for any other key."""
    parts = key.split("/")
    if (
        len(parts) == 4
        and f"{parts[0]}/" == BUILDS_PREFIX
        and parts[2] == _MANIFESTS
        and parts[3].endswith(_JSON)
        and parts[1]
        and len(parts[3]) > len(_JSON)
    ):
        return parts[1], parts[3].removesuffix(_JSON)
    return None


def latest_key(build_id: str) -> str:
    return f"{BUILDS_PREFIX}{build_id}/latest"


def fork_refs_prefix(build_id: str) -> str:
    """The prefix of the marks of every fork made from one of the build's snapshots."""
    return f"{BUILDS_PREFIX}{build_id}/forks/"


def fork_ref_key(build_id: str, snapshot_id: str, fork_id: str) -> str:
    """The mark of a fork ``fork_id`` made from the build's snapshot ``snapshot_id``."""
    return f"{fork_refs_prefix(build_id)}{snapshot_id}/{fork_id}"


def parse_fork_ref_key(key: str) -> tuple[str, str, str] | None:
    """(build id, snapshot id, fork id) of a fork's mark; None for any other key."""
    parts = key.split("/")
    if len(parts) == 5 and f"{parts[0]}/" == BUILDS_PREFIX and parts[2] == "forks":
        if all(parts[i] for i in (1, 3, 4)):
            return parts[1], parts[3], parts[4]
    return None


def pruned_key(build_id: str) -> str:
    return f"{BUILDS_PREFIX}{build_id}/pruned"


def pending_key(build_id: str, snapshot_id: str) -> str:
    return f"{PENDING_PREFIX}{build_id}/{snapshot_id}{_JSON}"


def gc_running_key(run_id: str) -> str:
    return f"{GC_RUNNING_PREFIX}{run_id}"
