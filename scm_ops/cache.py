"""The on-disk cache: private directories, and files read back only when this user wrote them.

scm-ops keeps two things on disk between processes: the compiled CPU kernels
(``<root>/cpu/*.so``, loaded into the process) and the GPU route choices
(``<root>/routes.json``). ``<root>`` is ``$SCM_OPS_CACHE_DIR``, else ``~/.cache/scm_ops``.

A file another local user can write must never be loaded or trusted: a library planted in
a cache runs its code inside the training process. So every directory scm-ops creates here
is created with mode 0700, and a file is read back only through :func:`open_private_file`,
which checks, on the opened directory and the opened file (no window between the check and
the use), that both are owned by the effective user and writable by nobody else, and that
the file is a regular file, not a symbolic link (a directory may be one: what is checked is
the directory it leads to). Anything else raises
:class:`UntrustedCacheError`, whose message names the path; callers warn and do without the
cache (the kernels are then built into a private temporary directory of the process, the
routes measured again).
"""
from __future__ import annotations

import os
import pathlib
import stat
import warnings
from typing import Optional

__all__ = ["CACHE_DIR_ENV", "UntrustedCacheError", "cache_root", "private_directory", "open_private_file",
           "read_private_text", "warn_untrusted"]

CACHE_DIR_ENV = "SCM_OPS_CACHE_DIR"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class UntrustedCacheError(OSError):
    """A cache directory or file that another user owns or can write (or a symbolic link)."""


def cache_root() -> Optional[pathlib.Path]:
    """$SCM_OPS_CACHE_DIR, else ~/.cache/scm_ops; None without a home directory."""
    directory = os.environ.get(CACHE_DIR_ENV)
    if directory:
        return pathlib.Path(directory)
    try:
        return pathlib.Path.home() / ".cache" / "scm_ops"
    except RuntimeError:
        return None


def _check(st: os.stat_result, path, kind: str) -> None:
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UntrustedCacheError(f"the cache {kind} {path} is owned by user id {st.st_uid}, not by this user "
                                  f"({euid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedCacheError(f"the cache {kind} {path} is writable by its group or by others "
                                  f"(mode {stat.S_IMODE(st.st_mode):04o})")


def private_directory(path: pathlib.Path) -> pathlib.Path:
    """Create `path` where missing, each missing level with mode 0700, and check the directory
    it names (a symbolic link is followed: a cache moved to another disk is common): owned by
    the effective user and writable by nobody else. Raises UntrustedCacheError naming the
    path, or OSError where it cannot be created or is not a directory."""
    path = pathlib.Path(path)
    missing = []
    for level in (path, *path.parents):
        if os.path.lexists(level):
            break
        missing.append(level)
    for level in reversed(missing):
        try:
            os.mkdir(level, 0o700)
        except FileExistsError:       # made by another process meanwhile: checked below
            pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"the cache directory {path} is not a directory")
    _check(st, path, "directory")
    return path


def open_private_file(path: pathlib.Path) -> int:
    """A read-only file descriptor of the cache file `path`, after checking its directory and
    the file itself as opened: owned by the effective user, writable by nobody else, the
    file a regular file and not a symbolic link. FileNotFoundError where it does not
    exist, UntrustedCacheError (naming the path) where it is refused. The caller closes it."""
    path = pathlib.Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        st = os.fstat(dir_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedCacheError(f"the cache directory {path.parent} is not a directory")
        _check(st, path.parent, "directory")
        try:
            fd = os.open(path.name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
        except OSError as err:
            if os.path.islink(path):
                raise UntrustedCacheError(f"the cache file {path} is a symbolic link") from err
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedCacheError(f"the cache file {path} is not a regular file")
        _check(st, path, "file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private_text(path: pathlib.Path) -> str:
    """The text of the cache file `path`, checked as open_private_file does."""
    with os.fdopen(open_private_file(path), encoding="utf-8") as fh:
        return fh.read()


def warn_untrusted(err: UntrustedCacheError, consequence: str, stacklevel: int = 3) -> None:
    """One RuntimeWarning naming the refused path and what scm-ops does instead."""
    warnings.warn(f"scm_ops: not using the cache: {err}; {consequence}. Another user could have written it: "
                  f"remove it, or set {CACHE_DIR_ENV} to a directory of your own.", RuntimeWarning,
                  stacklevel=stacklevel)
