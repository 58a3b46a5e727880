"""Which code a recorded figure came from: the commit, and whether the tree differed from it."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """``DTFAST_COMMIT`` when set (a copy of the tree whose git metadata is missing or stale, e.g. on a lent GPU
    machine: whoever sends the tree sets it); else ``git rev-parse --short=12 HEAD``, with ``+dirty`` when tracked
    files differ from it; ``unknown`` without a usable git checkout (never git's literal "HEAD" of a repository
    without commits)."""
    given = os.environ.get("DTFAST_COMMIT", "").strip()
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")
