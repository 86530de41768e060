"""The state directory of ``sshrpc serve``: created safely, or refused.

A local user must not be able to plant anything that root's (or the serving
user's) sshd will trust: its ``authorized_keys``, its config, the socket the
relays connect to.  So:

- ``prepare_state_dir`` creates the directory (0700), or accepts an existing
  one only if it is not a symbolic link, is owned by the serving user and is
  writable by no one else, and if every entry below it is the same (no
  symbolic links, no other owner, nothing group/world-writable, no hard links,
  nothing but files, directories and sockets).  Every directory above it must
  be owned by root or the serving user and be writable by no one else --
  sshd's ``StrictModes`` rule for the ``authorized_keys`` path, so sshd and
  this check agree (``/tmp``, mode 1777, fails both).  Anything else raises
  ``StateDirError`` with one line: what is wrong and what to do.
- ``write_file`` writes a file by creating a fresh random name with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` in the (re-checked) directory, then
  renaming it over the final name: a symbolic link or a planted file there is
  replaced, never written through.
- ``open_append`` opens a log for appending, never through a symbolic link,
  and only a regular file of ours with one link.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from pathlib import Path

from ._sshd import SSHDError

__all__ = [
    "StateDirError",
    "open_append",
    "prepare_state_dir",
    "temp_root",
    "write_file",
]

#: Depth of the state tree that is checked (it is two levels deep).
_MAX_DEPTH = 4
#: Entries checked before giving up: a state directory holds about ten.
_MAX_ENTRIES = 10_000


class StateDirError(SSHDError):
    """The state directory (or something in it or above it) is not safe to
    use.  The message is one line: the path, what is wrong, what to do."""


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _owner_problem(path: str, info: os.stat_result, uid: int) -> str | None:
    if info.st_uid == uid:
        return None
    return f"{path} is owned by {_name(info.st_uid)} (uid {info.st_uid}), not by {_name(uid)}"


def _writable(mode: int) -> str | None:
    who = [w for bit, w in ((0o020, "group"), (0o002, "others")) if mode & bit]
    return " and ".join(who) if who else None


def _home(uid: int) -> str | None:
    try:
        return os.path.realpath(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        return None


def _check_parents(path: str, uid: int) -> None:
    """Every directory traversed to reach ``path`` (symbolic links resolved):
    owned by root or ``uid``, writable by neither group nor others.  Stops
    above the user's home directory, as sshd does."""
    home = _home(uid)
    seen: set[str] = set()
    prefix = os.path.dirname(path)
    prefixes = []
    while True:
        prefixes.append(prefix)
        parent = os.path.dirname(prefix)
        if parent == prefix:
            break
        prefix = parent
    for prefix in prefixes:
        if not os.path.lexists(prefix):
            continue
        directory = os.path.realpath(prefix)
        while directory not in seen:
            seen.add(directory)
            info = os.stat(directory)
            if info.st_uid not in (0, uid):
                raise StateDirError(
                    f"{directory} (above the state directory) is owned by "
                    f"{_name(info.st_uid)} (uid {info.st_uid}), who could replace what is "
                    "below it; use a state directory whose every parent is owned by root "
                    f"or {_name(uid)}, such as ~/.local/state/sshrpc (the default)"
                )
            who = _writable(info.st_mode)
            if who:
                owners = "root" if uid == 0 else f"root and {_name(uid)}"
                raise StateDirError(
                    f"{directory} (above the state directory) is writable by others than "
                    f"{owners} ({who}, mode {stat.S_IMODE(info.st_mode):04o}): "
                    "they could rename the state directory away, and sshd's StrictModes "
                    "refuses keys below it; use a state directory whose every parent is "
                    "writable only by root or you, such as ~/.local/state/sshrpc (the default)"
                )
            if directory == home:
                break
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent


def _check_entry(path: str, info: os.stat_result, uid: int, *, top: bool = False) -> None:
    """One existing entry of the state tree (from ``lstat``)."""
    what = "the state directory" if top else path
    if stat.S_ISLNK(info.st_mode):
        raise StateDirError(
            f"{path} is a symbolic link; sshrpc follows none in its state directory "
            f"(someone may be pointing it at a file of yours): remove "
            f"{'it and let sshrpc create the directory' if top else 'it'} after checking "
            "where it points"
        )
    problem = _owner_problem(path, info, uid)
    if problem:
        raise StateDirError(
            f"{problem}: whoever owns it can replace the keys or programs sshd trusts; "
            f"remove {what} after checking its contents, or use another --state-dir"
        )
    mode = info.st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
        raise StateDirError(
            f"{path} is not a regular file, directory or socket; remove it after checking it"
        )
    who = _writable(mode) if not stat.S_ISSOCK(mode) else None
    if who:
        raise StateDirError(
            f"{path} is writable by {who} (mode {stat.S_IMODE(mode):04o}): someone else may "
            f"have changed what is in it; check it, then chmod go-w {path} (or remove it)"
        )
    if stat.S_ISREG(mode) and info.st_nlink > 1:
        raise StateDirError(
            f"{path} has {info.st_nlink} hard links: writing it could change another file; "
            "remove it after checking it"
        )


def _check_tree(directory: str, uid: int) -> None:
    """Every entry below ``directory`` (which is already checked)."""
    todo = [(directory, 1)]
    count = 0
    while todo:
        current, depth = todo.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                count += 1
                if count > _MAX_ENTRIES:
                    raise StateDirError(
                        f"{directory} holds more than {_MAX_ENTRIES} entries; "
                        "this is not a state directory sshrpc made: use another --state-dir"
                    )
                info = entry.stat(follow_symlinks=False)
                _check_entry(entry.path, info, uid)
                if stat.S_ISDIR(info.st_mode):
                    if depth >= _MAX_DEPTH:
                        raise StateDirError(
                            f"{entry.path} is nested too deep for a state directory "
                            "sshrpc made: use another --state-dir"
                        )
                    todo.append((entry.path, depth + 1))


def _make_parents(path: str, uid: int) -> None:
    """Create the missing directories above ``path`` (0700), checking each
    existing one first."""
    missing = []
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        missing.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    _check_parents(missing[-1] if missing else path, uid)
    for directory in reversed(missing):
        os.mkdir(directory, 0o700)
        _check_entry(directory, os.lstat(directory), uid)


def _private_dir(path: str, uid: int, *, top: bool) -> None:
    """Create ``path`` 0700, or check it (and make it 0700)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        info = os.lstat(path)
    _check_entry(path, info, uid, top=top)
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"{path} is not a directory; remove it or use another --state-dir")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (info.st_dev, info.st_ino):
            raise StateDirError(f"{path} changed while it was checked; try again")
        if stat.S_IMODE(again.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def prepare_state_dir(path: str | os.PathLike[str], *, subdirs: tuple[str, ...] = ()) -> Path:
    """Create the state directory or refuse it; return its absolute path.

    Creates ``path`` (and missing parents) with mode 0700 when absent;
    otherwise checks it and everything in it as the module docstring says,
    and sets it (and ``subdirs``, created if absent) to 0700.  Raises
    ``StateDirError`` (one line) when anything is unsafe; nothing is written
    then.  Blocking.
    """
    uid = os.geteuid()
    absolute = os.path.abspath(os.fspath(path))
    _make_parents(absolute, uid)
    _check_parents(absolute, uid)
    _private_dir(absolute, uid, top=True)
    _check_tree(absolute, uid)
    for name in subdirs:
        _private_dir(os.path.join(absolute, name), uid, top=False)
    return Path(absolute)


def temp_root() -> Path:
    """A place for throw-away state directories (scripts, benchmarks):
    ``~/.cache/sshrpc-tmp``, created 0700.  Not ``/tmp``: a state directory
    below a directory others can write is refused (sshd's StrictModes)."""
    root = Path.home() / ".cache" / "sshrpc-tmp"
    for directory in (root.parent, root):
        directory.mkdir(mode=0o700, exist_ok=True)
    return root


def _open_dir(directory: str | os.PathLike[str]) -> int:
    """An fd of ``directory``, re-checked: ours, a directory, no link, not
    writable by others."""
    path = os.fspath(directory)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_entry(path, os.fstat(fd), os.geteuid())
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(
    directory: str | os.PathLike[str], name: str, data: bytes, *, mode: int = 0o600
) -> None:
    """Write ``directory/name`` atomically: a fresh random name created with
    ``O_CREAT | O_EXCL | O_NOFOLLOW`` (mode ``mode``), written, then renamed
    over ``name``.  Whatever was at ``name`` (a file, a symbolic link) is
    replaced, never written through.  Blocking; on error nothing is left."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    dir_fd = _open_dir(directory)
    try:
        temp = f".{name}.{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, mode, dir_fd=dir_fd)
        try:
            try:
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def open_append(directory: str | os.PathLike[str], name: str, *, mode: int = 0o600) -> int:
    """An fd appending to ``directory/name`` (created ``mode`` if absent),
    opened with ``O_NOFOLLOW``; raises ``StateDirError`` unless it is a
    regular file of ours, with one link, writable by no one else.  Blocking."""
    dir_fd = _open_dir(directory)
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, mode, dir_fd=dir_fd)
        except OSError as exc:
            raise StateDirError(
                f"cannot open {os.path.join(os.fspath(directory), name)}: {exc.strerror}"
            ) from None
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        path = os.path.join(os.fspath(directory), name)
        _check_entry(path, info, os.geteuid())
        if not stat.S_ISREG(info.st_mode):
            raise StateDirError(f"{path} is not a regular file; remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd
