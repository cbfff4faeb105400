"""A person's requests to a folder's engine over the control socket: versions, restore, override, revert."""

from __future__ import annotations

from typing import Any

from agent.errors import UserError
from agent.sync.service import SyncService


async def folder_request(sync: SyncService, cmd: str, args: dict[str, Any]) -> Any:
    """Answer `versions`, `restore`, `folder_override` or `folder_revert`; args are checked here.

    :raises UserError: a malformed request, an unknown folder, no such version, a wrong folder type.
    """
    folder, path, at = args.get("folder"), args.get("path", ""), args.get("at")
    if (folder is not None and not isinstance(folder, str)) or not isinstance(path, str):
        raise UserError(f"{cmd} needs a folder id and a path")
    if at is not None and (not isinstance(at, int | float) or isinstance(at, bool)):
        raise UserError("restore --at needs a time")
    if cmd == "versions":
        return {"versions": await sync.versions(folder, path.strip("/"))}
    if folder is None:
        raise UserError(f"{cmd} needs a folder id")
    if cmd == "restore":
        return await sync.restore(folder, path.strip("/"), None if at is None else float(at))
    if cmd == "folder_override":
        return await sync.override(folder)
    return await sync.revert(folder)
