"""Projects: an idea brief and the understanding-interview answers, a new version per edit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from . import projects
from .cursors import Cursor, paged
from .deps import Me, Rt
from .model import Project
from .problems import responses
from .schemas_projects import CreateProject, EditProject, ProjectList, ProjectOut, ReplaceProject

router = APIRouter(tags=["projects"])


async def _get(rt: Rt, me: Me, project_id: str, version: int | None = None) -> Project:
    try:
        return await projects.get(rt.store, me, project_id, version)
    except projects.ProjectNotFound as err:
        raise HTTPException(404, str(err)) from err


@router.post(
    "/v1/projects",
    status_code=201,
    response_model=ProjectOut,
    responses=responses(401, 413, 422),
)
async def create_project(body: CreateProject, rt: Rt, me: Me) -> ProjectOut:
    """A new project (version 1)."""
    qna = [q.model_dump(mode="json") for q in body.understanding_qna]
    return ProjectOut.of(await projects.create(rt.store, me, body.name, body.idea_brief, qna))


@router.get("/v1/projects", response_model=ProjectList, responses=responses(400, 401, 422))
async def list_projects(
    rt: Rt,
    me: Me,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Cursor = None,
) -> ProjectList:
    """The caller's projects (their latest versions), newest first."""
    page, next_cursor = await paged(
        lambda n, before: rt.store.list_projects(me.user_id, limit=n, before=before),
        limit,
        cursor,
        lambda p: (p.created_at, p.project_id),
    )
    return ProjectList(
        projects=[ProjectOut.of(p, detail=False) for p in page], next_cursor=next_cursor
    )


@router.get(
    "/v1/projects/{project_id}", response_model=ProjectOut, responses=responses(401, 404, 422)
)
async def get_project(
    project_id: str,
    rt: Rt,
    me: Me,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> ProjectOut:
    """The project's latest version, or ``?version=N``."""
    return ProjectOut.of(await _get(rt, me, project_id, version))


@router.get(
    "/v1/projects/{project_id}/versions",
    response_model=list[ProjectOut],
    responses=responses(401, 404),
)
async def project_versions(project_id: str, rt: Rt, me: Me) -> list[ProjectOut]:
    """Every version, oldest first (names and dates; GET ?version=N for one in full)."""
    await _get(rt, me, project_id)
    return [ProjectOut.of(p, detail=False) for p in await rt.store.project_versions(project_id)]


async def _edit(rt: Rt, me: Me, project_id: str, body: EditProject | ReplaceProject) -> ProjectOut:
    qna = (
        [q.model_dump(mode="json") for q in body.understanding_qna]
        if body.understanding_qna is not None
        else None
    )
    try:
        p = await projects.edit(
            rt.store,
            me,
            project_id,
            name=body.name,
            idea_brief=body.idea_brief,
            qna=qna,
            base_version=body.base_version,
        )
    except projects.ProjectNotFound as err:
        raise HTTPException(404, str(err)) from err
    except projects.VersionConflict as err:
        raise HTTPException(409, str(err)) from err
    return ProjectOut.of(p)


@router.patch(
    "/v1/projects/{project_id}",
    response_model=ProjectOut,
    responses=responses(401, 404, 409, 413, 422),
)
async def patch_project(project_id: str, body: EditProject, rt: Rt, me: Me) -> ProjectOut:
    """Change some fields: a new version (builds of older versions keep theirs)."""
    return await _edit(rt, me, project_id, body)


@router.put(
    "/v1/projects/{project_id}",
    response_model=ProjectOut,
    responses=responses(401, 404, 409, 413, 422),
)
async def put_project(project_id: str, body: ReplaceProject, rt: Rt, me: Me) -> ProjectOut:
    """Replace the brief and Q&A: a new version."""
    return await _edit(rt, me, project_id, body)
