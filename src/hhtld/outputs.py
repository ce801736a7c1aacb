"""Output files: written atomically, never over an input, never over a non-file.

Every file hhtld writes (packs, decoded checkpoints, JSON reports) goes to a
temporary file in the target's folder and is renamed over the target only
when complete. A target that is an input of the same command, a directory,
or not a regular file (a device, a FIFO, a symlink) is refused up front.

Temporary files and folders have recognisable names,
``.<target name>.hhtld-<host>-<pid>-<token><suffix>`` (suffix ``.data``,
``.tmp``, ``.round``, ``.calibration`` or ``.units``). The process that made one removes
it when it finishes, fails or is interrupted (SIGINT; the command line turns
SIGTERM into the same clean unwind, and removes whatever is still
registered on the way out). A process killed outright (SIGKILL, the OOM
killer) cannot; the next hhtld that writes into the same folder removes the
leftovers whose process, on this host, is gone.

A target may be published without overwriting (``overwrite=False``): the
temporary file is hard-linked to the target name, which fails if the name
exists, so two processes writing into one folder never replace each other's
files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable

from .errors import OptionsError

TEMP_SUFFIXES = (".data", ".tmp", ".round", ".untuned", ".calibration", ".units", ".export")
_TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.hhtld-(?P<host>[A-Za-z0-9_]{1,24})-(?P<pid>[0-9]{1,10})-(?P<token>[0-9a-f]{8})"
                      r"(?P<suffix>" + "|".join(re.escape(s) for s in TEMP_SUFFIXES) + r")$")
_live: set[Path] = set()  # temporary paths this process made and has not removed yet


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname() or "host")[:24] or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: str | os.PathLike) -> None:
    """Give a temporary file (0600) or folder (0700) the permissions a plain ``open`` or
    ``mkdir`` would."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


# --- temporary files ---------------------------------------------------------------------------
def temp_name(target: str | os.PathLike, suffix: str) -> Path:
    """A fresh temporary name next to ``target`` (not created)."""
    if suffix not in TEMP_SUFFIXES:
        raise ValueError(f"temporary suffix {suffix!r} is not one of {TEMP_SUFFIXES}")
    t = Path(target)
    return t.with_name(f".{t.name}.hhtld-{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def make_temp_file(target: str | os.PathLike, suffix: str) -> tuple[int, Path]:
    """Create a temporary file next to ``target`` (mode 0600, never an existing name):
    ``(fd open for writing, path)``. It is registered until :func:`remove_temp`."""
    while True:
        p = temp_name(target, suffix)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            continue
        _live.add(p)
        return fd, p


def make_temp_dir(target: str | os.PathLike, suffix: str) -> Path:
    """Create a private temporary folder next to ``target``; registered until :func:`remove_temp`."""
    while True:
        p = temp_name(target, suffix)
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            continue
        _live.add(p)
        return p


def remove_temp(path: str | os.PathLike) -> None:
    """Remove a temporary file or folder (if still there) and forget it."""
    p = Path(path)
    _live.discard(p)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def forget_temp(path: str | os.PathLike) -> None:
    """The temporary path became a real file (renamed): stop tracking it."""
    _live.discard(Path(path))


def remove_all_temps() -> list[Path]:
    """Remove every temporary path this process still holds (the command line's last step)."""
    gone = sorted(_live)
    for p in gone:
        remove_temp(p)
    return gone


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def held_by_live_process(host: str, pid: int) -> bool:
    """Whether ``pid`` on ``host`` (as a temporary name or a state file records them) is a
    live process other than this one (a process on another host is taken as live)."""
    if host != _host():
        return True
    return pid != os.getpid() and _pid_alive(pid)


def this_process() -> dict[str, Any]:
    """``{"host": ..., "pid": ...}`` of this process, as :func:`held_by_live_process` reads them."""
    return {"host": _host(), "pid": os.getpid()}


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the hhtld temporary files and folders in ``folder`` that a process
    on this host left behind when it was killed (its pid is gone). Returns them."""
    d = Path(folder) if str(folder) else Path(".")
    host, me = _host(), os.getpid()
    removed = []
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith("."):
            continue
        m = _TEMP_RE.match(e.name)
        if m is None or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid == me or _pid_alive(pid):
            continue
        p = d / e.name
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        except OSError:
            pass
    return removed


def publish(tmp: str | os.PathLike, target: str | os.PathLike, overwrite: bool = True,
            what: str = "output") -> Path:
    """Rename the complete temporary file ``tmp`` to ``target``.

    ``overwrite=False``: never replace an existing file, even one that appeared
    after the caller checked (another process writing into the same folder):
    the file is linked to its name, which fails if the name exists."""
    tmp, target = Path(tmp), Path(target)
    if overwrite:
        os.replace(tmp, target)
        forget_temp(tmp)
        return target
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OptionsError(f"{target}: exists; decode into a new folder or pass --force to overwrite") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # no hard links here: reserve the name (fails if it exists), then replace the reservation
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise OptionsError(f"{target}: exists; decode into a new folder or pass --force to overwrite") from None
        os.replace(tmp, target)
    else:
        tmp.unlink(missing_ok=True)
    forget_temp(tmp)
    return target


# --- targets ---------------------------------------------------------------------------------------
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      what: str = "output") -> Path:
    """Refuse a file target that is an input, a directory, or not a regular file."""
    p = Path(path)
    for i in inputs:
        if same_file(p, i):
            raise OptionsError(f"{p}: is an input of this command; refusing to overwrite it with the {what}")
    if p.is_dir():
        raise OptionsError(f"{p}: is a directory; the {what} needs a file name")
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise OptionsError(f"{p}: exists and is not a regular file; refusing to replace it")
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to a temporary sibling, then rename it over ``path``
    (``overwrite=False``: fail if ``path`` exists by then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    fd, tmp = make_temp_file(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        make_public(tmp)
        publish(tmp, path, overwrite)
    finally:
        remove_temp(tmp)
    return path


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Pretty JSON (2-space indent, trailing newline), written atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))
