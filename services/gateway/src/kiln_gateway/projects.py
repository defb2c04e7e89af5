"""Projects: an idea brief and its understanding-interview answers, versioned on every edit."""

from __future__ import annotations

import uuid
from typing import Any

from .model import Caller, Project
from .ports import BuildStore


class ProjectNotFound(Exception):
    pass


class VersionConflict(Exception):
    pass


async def create(
    store: BuildStore, caller: Caller, name: str, idea_brief: str, qna: list[dict[str, Any]]
) -> Project:
    return await store.create_project(uuid.uuid4().hex, caller.user_id, name, idea_brief, qna)


async def get(
    store: BuildStore, caller: Caller, project_id: str, version: int | None = None
) -> Project:
    """The caller's project (a version of it); another user's project does not exist for them."""
    project = await store.get_project(project_id, version) if len(project_id) <= 64 else None
    if project is None or project.user_id != caller.user_id:
        what = "project" if version is None else f"version {version} of the project"
        raise ProjectNotFound(f"{what} not found")
    return project


async def edit(
    store: BuildStore,
    caller: Caller,
    project_id: str,
    *,
    name: str | None,
    idea_brief: str | None,
    qna: list[dict[str, Any]] | None,
    base_version: int | None,
) -> Project:
    """A new version from the latest one with the given fields replaced (None keeps a field)."""
    current = await get(store, caller, project_id)
    result = await store.add_project_version(
        project_id,
        base_version,
        current.name if name is None else name,
        current.idea_brief if idea_brief is None else idea_brief,
        current.understanding_qna if qna is None else qna,
    )
    if result == "missing":
        raise ProjectNotFound("project not found")
    if result == "conflict":
        raise VersionConflict(
            f"the project was edited meanwhile (latest version is not {base_version}); "
            "reload it and edit again"
        )
    return result
