"""The snapshot service's requests to the sandbox (over ``kiln.rpc.sandbox.*``): the manifest of
a build's sandbox, and the upload of the blobs S3 lacks, served from the sandbox as it is."""

from __future__ import annotations

from kiln_contracts import ManifestReply, ManifestRequest, UploadReply, UploadRequest

from .ports import SandboxError
from .sandboxes import Sandboxes


async def manifest(sandboxes: Sandboxes, request: ManifestRequest) -> ManifestReply:
    """The manifest of the build's sandbox as it is (an error reply if there is none)."""
    try:
        sandbox = await sandboxes.existing(request.build_id)
        entries = await sandbox.manifest(
            request.excludes, dirs_and_symlinks=request.include_dirs_and_symlinks
        )
    except (SandboxError, OSError) as err:
        return ManifestReply(ok=False, error=str(err))
    return ManifestReply(entries=entries)


async def upload(sandboxes: Sandboxes, request: UploadRequest) -> UploadReply:
    """The blobs the snapshot service asked for, PUT from the build's sandbox to its presigned
    URLs; how many went and their bytes."""
    try:
        sandbox = await sandboxes.existing(request.build_id)
    except SandboxError as err:
        return UploadReply(ok=False, error=str(err))
    results = await sandbox.upload_all(request.uploads)
    sent = [r for r in results if isinstance(r, int)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        return UploadReply(
            ok=False,
            error="; ".join(_describe(e) for e in errors[:5])
            + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""),
            uploaded=len(sent),
            bytes_uploaded=sum(sent),
        )
    return UploadReply(uploaded=len(sent), bytes_uploaded=sum(sent))


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, SandboxError) else f"{type(err).__name__}: {err}"
