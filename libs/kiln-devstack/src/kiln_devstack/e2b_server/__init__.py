"""A local E2B-compatible server: E2B's control-plane REST API and envd, on one aiohttp port, for
the unmodified ``e2b`` SDK pointed here by its own settings (``E2B_API_URL`` and
``E2B_SANDBOX_URL``, or ``api_url=`` / ``sandbox_url=``).

What it speaks (as read from the pinned SDK's source):

- REST, ``X-API-KEY``, errors ``{"code", "message"}``: ``POST /v2/sandboxes`` (201; an
  ``Idempotency-Key`` returns the sandbox first made with it), ``POST /v2/sandboxes/{id}/connect``
  (resumes a paused one; 404 when gone), ``POST /sandboxes/{id}/timeout``,
  ``POST /sandboxes/{id}/pause`` (409 when already paused), ``DELETE /sandboxes/{id}``,
  ``GET /sandboxes/{id}``, ``GET /v2/sandboxes`` (``metadata`` / ``state`` filters, paged by
  ``x-next-token``).
- envd, Connect RPC with JSON codecs, told apart by ``E2b-Sandbox-Id``: unary calls
  ``application/json``; server streams ``application/connect+json`` in 5-byte envelopes closed
  by an end-of-stream frame. ``process.Process/Start|Connect|SendSignal|List``,
  ``filesystem.Filesystem/Stat|MakeDir|Move|ListDir|Remove``, ``GET /files``, multipart and
  octet-stream ``POST /files``, ``/health``. Messages are the SDK's own generated classes.

What E2B's side does, reproduced: a command is ``/bin/bash -l -c`` as the SDK sends it, with
``HOME=/home/user``; at its ``Connect-Timeout-Ms`` deadline it is killed and its stream ends with
exit -1, "signal: killed"; a paused or killed sandbox's envd requests get 502 "... was not
found"; a sandbox ends at its timeout; ``MakeDir`` of an existing directory is ALREADY_EXISTS.

Each sandbox is a directory and, where the host allows unprivileged namespaces (``unshare -r -m
-p``), a user, mount and PID namespace in which that directory is mounted at the real
``/home/user`` (so its paths are E2B's; the user inside is the namespace's uid 0, named ``user``
only by ``USER``). Killing the namespace's first process ends every process in it, as a VM that
stops. Where namespaces are refused (``namespaces=False``), commands run on the host with
``HOME`` and ``cwd`` translated to the directory: a command that spells ``/home/user`` then
misses it.

Faults for tests (methods of :class:`E2BServer`): ``kill`` (mid-command too), ``pause`` from
outside, ``expire``, ``hang_health``, ``refuse_creates`` (429 or 503), ``guest_unresponsive``
(the next resume fails as needing a reboot), ``drop_streams`` (streams end without an end
event). A development and test tool, not a security boundary.

The modules: ``server`` (:class:`E2BServer`: the port, the reaper, the faults), ``control`` (the
REST API), ``process`` and ``files`` (envd), ``wire`` (errors and Connect envelopes), ``box`` (a
sandbox's state and what happens to it), ``namespaces`` (the host's side), ``__main__`` (the
process ``kiln up`` runs).
"""

from .server import E2BServer

__all__ = ["E2BServer"]
