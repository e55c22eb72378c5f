"""Errors whose messages tell the user what to do; the CLI prints them without a traceback.

Each carries the exit status the CLI returns for it (the table is in the README and ``adapters --help``):

    UserFacingError   1   a stage could not do its work (storage, pre-flight, a domain failed): the cause and the fix
    UsageError        2   what was asked cannot start as asked (no prepared data yet, a domain no source provides):
                          nothing ran; the message names the fix
"""
from __future__ import annotations

from typing import Callable, Optional


class UserFacingError(RuntimeError):
    exit_code = 1


class UsageError(UserFacingError):
    exit_code = 2


# a full disk (or quota): one line naming the path and the free space, wherever it was raised
NO_SPACE_ERRNOS = (28, 122)   # ENOSPC, EDQUOT
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def find_cause(exc: BaseException, match: Callable[[BaseException], bool]) -> Optional[BaseException]:
    """The first exception in ``exc``'s chain for which ``match`` holds: its causes and contexts, a Ray
    task error's original exception (``cause``) and a Ray Train controller's failure; None when none does."""
    seen, todo = set(), [exc]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if match(x):
            return x
        todo += [getattr(x, "cause", None), getattr(x, "controller_failure", None), x.__cause__, x.__context__]
    return None


def no_space(exc: BaseException) -> Optional[BaseException]:
    """The out-of-space error inside ``exc`` (its causes, contexts, a Ray task's original error), or None."""
    found = find_cause(exc, lambda x: isinstance(x, OSError) and (
        x.errno in NO_SPACE_ERRNOS or any(t in str(x) for t in NO_SPACE_TEXT)))
    if found is None and any(t in str(exc) for t in NO_SPACE_TEXT):   # a wrapper that kept only the text
        return exc
    return found


def no_space_message(exc: BaseException, where: str) -> Optional[str]:
    """'no space left on device writing PATH (N MB free there): ...' when ``exc`` is a full disk, else None.
    PATH: the file the error names, else ``where`` (the output)."""
    e = no_space(exc)
    if e is None:
        return None
    path = getattr(e, "filename", None) or where
    return (f"no space left on device writing {path} ({_free(str(path))} free there): free some space or "
            f"choose another --output; the same command then resumes")


def _free(path: str) -> str:
    import shutil
    from pathlib import Path
    if "://" in path:
        return "unknown"
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.1f} MB"
    except OSError:
        return "unknown"
