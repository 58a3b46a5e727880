"""Temporary files and folders for atomic writes, with the permissions a plain ``open``/``mkdir`` would give.

``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders. Renamed into place, those would leave exported
weights, configs and checkpoints readable by their owner only (e.g. not by the group's detection jobs on a shared
cluster). These wrappers apply the usual default, 0666 / 0777 minus the process umask, before anything is written.
"""

from __future__ import annotations

import os
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask would set it for a moment)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str, umask: int | None = None) -> None:
    """Give ``path`` the mode a plain open() (file) or mkdir() (folder) would have given it."""
    umask = current_umask() if umask is None else umask
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def set_default_modes(folder: str) -> None:
    """``set_default_mode`` on ``folder`` and everything under it (libraries such as safetensors write 0600 files)."""
    umask = current_umask()
    set_default_mode(folder, umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            set_default_mode(os.path.join(root, name), umask)


def mkstemp(dir: str, prefix: str, suffix: str = "") -> tuple[int, str]:  # noqa: A002 - tempfile's name
    fd, path = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    try:
        set_default_mode(path)
    except BaseException:  # the caller never sees the name: remove the file here
        os.close(fd)
        os.remove(path)
        raise
    return fd, path


def mkdtemp(dir: str, prefix: str) -> str:  # noqa: A002 - tempfile's name
    path = tempfile.mkdtemp(dir=dir, prefix=prefix)
    try:
        set_default_mode(path)
    except BaseException:  # the caller never sees the name: remove the folder here
        os.rmdir(path)
        raise
    return path


def replace_folder(tmp: str, dest: str) -> None:
    """Put the complete folder ``tmp`` at ``dest``, replacing an older ``dest``: the old one is moved to
    ``dest.old`` first and deleted after, so an interruption leaves the old folder or the new one (or ``dest.old``
    to recover), never half of one."""
    import shutil

    old = dest + ".old"
    shutil.rmtree(old, ignore_errors=True)  # left by a replacement that stopped between the two renames
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
