"""``PUT/DELETE /v1/admin/prefixes/{name}`` (bearer token), and loading the prefix directory at start.

Prefix names are ``[A-Za-z0-9._-]{1,64}`` (not ``.`` or ``..``) and resolve to a folder directly
inside the prefix directory, whose files must not point outside it. A folder that fails any check
(``PrefixRegistry``: config fields and types, fingerprint, safetensors header against the config) is
skipped with a warning at start and answers 400 naming what is wrong on ``PUT``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from prefixtune.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from prefixtune.errors import UnknownPrefixError
from prefixtune.server.api_errors import APIError
from prefixtune.server.config import NAME_PATTERN
from prefixtune.server.state import ServerState, server_state
from prefixtune.serving.engine import Engine

logger = logging.getLogger(__name__)
router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


def prefix_path(root: Path, name: str) -> Path:
    """The folder of prefix ``name``, directly inside ``root``; APIError 400 for a bad name, 404 if absent.

    Nothing outside ``root`` is reached: the name cannot hold a separator, ``.`` and ``..`` are refused,
    and the folder and its two files must resolve inside ``root``."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise APIError(400, f"prefix name {name!r} must match {NAME_PATTERN.pattern} (and not be '.' or '..')",
                       param="name")
    base = root.resolve()
    folder = (base / name).resolve()
    if folder.parent != base or not folder.is_dir():
        raise APIError(404, f"no prefix folder {name!r} in the prefix directory", param="name", code="not_found")
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        if (folder / file).resolve().parent != folder:
            raise APIError(400, f"prefix {name!r}: {file} points outside its folder", param="name")
    return folder


def load_prefix_dir(engine: Engine, root: Path, model_name: str) -> list[str]:
    """Register every valid prefix folder directly inside ``root``; returns the names (bad ones are logged)."""
    loaded = []
    for entry in sorted(root.iterdir()):
        if not (entry / CONFIG_NAME).is_file():
            continue
        try:
            if entry.name == model_name:
                raise APIError(409, f"prefix {entry.name!r} has the base model's name", param="name")
            engine.add_prefix(entry.name, prefix_path(root, entry.name))
            loaded.append(entry.name)
        except Exception as exc:
            logger.warning("skipping prefix folder %s: %s", entry, getattr(exc, "message", exc))
    return loaded


def _check_admin(request: Request, state: ServerState) -> None:
    if not state.admin_token or state.config.prefix_dir is None:
        raise APIError(404, f"the admin endpoint is off (set {state.config.admin_token_env} and a prefix directory)",
                       code="not_found")
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {state.admin_token}".encode()):
        raise APIError(401, "missing or wrong admin token (Authorization: Bearer ...)", kind="authentication_error")


@router.put("/v1/admin/prefixes/{name}")
async def add_prefix(name: str, request: Request, state: State) -> dict[str, Any]:
    _check_admin(request, state)
    if name == state.config.model_name:
        raise APIError(409, f"prefix {name!r} would hide the base model", param="name")
    folder = prefix_path(Path(state.config.prefix_dir), name)  # type: ignore[arg-type]
    try:
        length = await asyncio.to_thread(state.engine.add_prefix, name, folder)
    except (ValueError, OSError, LookupError, TypeError) as exc:
        raise APIError(400, f"prefix {name!r}: {exc}", param="name") from exc
    return {"id": name, "object": "model", "prefix_length": length}


@router.delete("/v1/admin/prefixes/{name}")
async def remove_prefix(name: str, request: Request, state: State) -> dict[str, Any]:
    _check_admin(request, state)
    try:
        state.engine.remove_prefix(name)
    except UnknownPrefixError as exc:
        raise APIError(404, f"model {name!r} does not exist", param="name", code="model_not_found") from exc
    return {"id": name, "object": "model", "deleted": True}
