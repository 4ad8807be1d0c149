"""The credential directory: one `<target>.json` ExecCredential per target, written atomically.

Argo CD's exec command is `cat <dir>/<target>.json`, so a reader must always see either the old
complete file or the new complete file: write a temp file in the same directory, fsync, rename.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path

from .exec_credential import credential_expiration

log = logging.getLogger(__name__)

FILE_MODE = 0o600
_SUFFIX = ".json"
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".tmp"
# Broker target names are `<namespace>.<name>` (DNS subdomain characters). Anything else could
# escape the directory or collide with temp files, so it is never used as a file name.
_SAFE_TARGET = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def is_safe_target_name(target: str) -> bool:
    return bool(_SAFE_TARGET.match(target)) and ".." not in target


def credential_path(directory: Path, target: str) -> Path:
    if not is_safe_target_name(target):
        raise ValueError(f"target name {target!r} is not a safe file name")
    return directory / f"{target}{_SUFFIX}"


def write_credential(directory: Path, target: str, credential: dict) -> Path:
    """Atomically replaces `<dir>/<target>.json` (mode 0600) with the credential."""
    path = credential_path(directory, target)
    data = json.dumps(credential, separators=(",", ":")).encode()
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f"{_TEMP_PREFIX}{target}.", suffix=_TEMP_SUFFIX)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return path


def remove_credential(directory: Path, target: str) -> bool:
    """Removes the target's file; False when there was none."""
    try:
        credential_path(directory, target).unlink()
    except FileNotFoundError:
        return False
    _fsync_directory(directory)
    return True


def existing_credentials(directory: Path) -> dict[str, tuple[datetime, str] | None]:
    """Credential files already in the directory (e.g. after a container restart):
    target -> (stated expiry, apiVersion), or None when the file is not a usable ExecCredential.

    Leftover temp files from an interrupted write are removed on the way.
    """
    found: dict[str, tuple[datetime, str] | None] = {}
    for entry in directory.iterdir():
        name = entry.name
        if name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX):
            entry.unlink(missing_ok=True)
            continue
        if not name.endswith(_SUFFIX) or not entry.is_file():
            continue
        target = name[: -len(_SUFFIX)]
        if not is_safe_target_name(target):
            continue
        try:
            credential = json.loads(entry.read_bytes())
            found[target] = (credential_expiration(credential), str(credential.get("apiVersion", "")))
        except (OSError, ValueError):
            found[target] = None
    return found


def _fsync_directory(directory: Path) -> None:
    # Makes the rename/unlink durable on disk-backed volumes; a no-op cost on tmpfs.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
