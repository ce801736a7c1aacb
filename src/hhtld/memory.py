"""How much memory this process may still take, read before a large allocation.

A pack declares the shapes it decodes to, and a small pack may declare a
huge tensor (an hhtl-d row costs 4 bytes whatever its width). Whether that
is a lie or a real wide tensor, a decode must know what it will allocate
before allocating it, and refuse (or stream) when it will not fit. The
room is the smallest of what the operating system says:

* available memory (``MemAvailable`` in ``/proc/meminfo``);
* the cgroup's memory limit less its usage (cgroup v2 ``memory.max``, v1
  ``memory.limit_in_bytes``), not counting its inactive file cache;
* the address-space and data-segment limits (``RLIMIT_AS``,
  ``RLIMIT_DATA``, as ``ulimit -v`` / ``ulimit -d`` set them) less what the
  process already maps (``VmSize``, ``VmData``);

less a margin for the interpreter and its libraries (a tenth, at least
``MARGIN_MIN``). A limit set by the user (:func:`set_memory_limit`, the
``HHTLD_MEMORY_LIMIT`` environment variable, ``--memory-limit`` on the
command line) replaces that reading. Linux only reads all of these; on other
systems only the resource limits are known.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionsError

ENV_LIMIT = "HHTLD_MEMORY_LIMIT"
MARGIN_FRACTION = 0.10
MARGIN_MIN = 128 << 20
# address space a new thread takes under RLIMIT_AS: its stack (8 MiB) and a malloc arena (glibc
# reserves 64 MiB), with what the interpreter adds (measured: about 96 MiB a thread)
THREAD_ADDRESS_SPACE = 96 << 20

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
_user_limit: int | None = None


@dataclass(frozen=True)
class Room:
    """Bytes a decode may still allocate, and what set that number."""

    bytes: int | None  # None: nothing known limits this process
    source: str

    def fits(self, need: int) -> bool:
        return self.bytes is None or need <= self.bytes

    def describe(self) -> str:
        return "no known limit" if self.bytes is None else f"{format_bytes(self.bytes)} ({self.source})"


def parse_size(text: str | int, what: str = "memory limit") -> int:
    """Bytes from ``"4G"``, ``"512MiB"``, ``"1.5GB"`` or a plain number of bytes
    (K/M/G/T alone are powers of 1024). An OptionsError names the text otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise OptionsError(f"{what} {text!r} is not a size (examples: 4G, 512MiB, 1.5GB, 1073741824)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise OptionsError(f"{what} {text!r} must be more than 0 bytes")
    return n


def format_bytes(n: int | float) -> str:
    """``16.0 GiB``, ``584.0 KiB``: binary units, one decimal."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def set_memory_limit(limit: int | str | None) -> None:
    """Set (or, with None, clear) this process's decode memory limit: bytes or a
    size string. It replaces the operating system's reading, and the
    ``HHTLD_MEMORY_LIMIT`` environment variable, for every later decode."""
    global _user_limit
    _user_limit = None if limit is None else parse_size(limit)


@contextmanager
def memory_limit(limit: int | str | None):
    """Within it, :func:`set_memory_limit` ``(limit)`` (None: the limit stays as it is);
    the limit before it is put back after (the command line's ``--memory-limit`` lasts
    for its command, also when ``main`` runs inside another program)."""
    global _user_limit
    before = _user_limit
    if limit is not None:
        set_memory_limit(limit)
    try:
        yield
    finally:
        _user_limit = before


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2 without a limit): None


def _stat_value(path: Path, key: str) -> int:
    """A counter of a cgroup's ``memory.stat`` (0 when missing)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_room(cgroup_file: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The tightest cgroup limit less what it holds, from this process's own cgroup up to
    the root. What it holds is its usage less its inactive file cache (``memory.stat``'s
    ``inactive_file``, v1 ``total_inactive_file``), as ``docker stats`` counts it: the
    checkpoint's pages read through a memory map count in the usage, and the kernel takes
    them back before it runs out."""
    best = None
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_file, usage_file, cache_key = root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
            cache_key = "total_inactive_file"
        else:
            continue
        d = base / rel.lstrip("/")
        for folder in [d, *d.parents]:
            if not str(folder).startswith(str(base)):
                break
            limit, used = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is not None and used is not None and limit < (1 << 60):  # v1 writes "no limit" as ~2**63
                held = max(0, used - _stat_value(folder / "memory.stat", cache_key))
                room = max(0, limit - held)
                best = room if best is None else min(best, room)
    return best


def _status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def resident_bytes() -> int:
    """The process's resident memory now (``VmRSS``; 0 where it cannot be read)."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """The process's peak resident memory so far (``VmHWM``; 0 where it cannot be read)."""
    return _status_bytes("VmHWM")


def _rlimit(which: str) -> int | None:
    """The soft resource limit ``which`` (e.g. ``"RLIMIT_AS"``) in bytes; None when unlimited or unknown."""
    try:
        import resource  # noqa: PLC0415 - not on every system
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, _ = resource.getrlimit(getattr(resource, which))
    return None if soft == resource.RLIM_INFINITY else soft


def _rlimit_room(which: str, used_key: str) -> int | None:
    soft = _rlimit(which)
    return None if soft is None else max(0, soft - _status_bytes(used_key))


def file_size_limit() -> int | None:
    """The largest file this process may write (``RLIMIT_FSIZE``, ``ulimit -f``; None: no limit)."""
    return _rlimit("RLIMIT_FSIZE")


def address_space_room() -> int | None:
    """What ``RLIMIT_AS`` still allows this process to map (None: no limit)."""
    return _rlimit_room("RLIMIT_AS", "VmSize")


def system_room() -> Room:
    """The operating system's reading (the smallest of the sources above), less the margin."""
    found = [(b, s) for b, s in ((_meminfo_available(), "available memory"), (_cgroup_room(), "cgroup memory limit"),
                                 (address_space_room(), "RLIMIT_AS address-space limit"),
                                 (_rlimit_room("RLIMIT_DATA", "VmData"), "RLIMIT_DATA data limit")) if b is not None]
    if not found:
        return Room(None, "no limit known")
    b, source = min(found)
    return Room(max(0, b - max(MARGIN_MIN, int(b * MARGIN_FRACTION))), f"{source}, less a margin")


def memory_room(limit: int | str | None = None) -> Room:
    """Bytes a decode may allocate now: ``limit`` when given, else the limit set by
    :func:`set_memory_limit`, else ``HHTLD_MEMORY_LIMIT``, else :func:`system_room`."""
    if limit is not None:
        return Room(parse_size(limit), "the limit given")
    if _user_limit is not None:
        return Room(_user_limit, "--memory-limit")
    env = os.environ.get(ENV_LIMIT, "").strip()
    if env:
        return Room(parse_size(env, f"{ENV_LIMIT}="), ENV_LIMIT)
    return system_room()


def threads_that_fit(wanted: int, keep: int = 0, per_thread: int = 0) -> int:
    """How many threads (at most ``wanted``, at least 1: the calling thread) the
    address-space limit leaves room for, each taking ``per_thread`` bytes of work
    besides its stack, with ``keep`` bytes left for the work itself: a thread pool
    is never started where its threads cannot get their stacks."""
    room = address_space_room()
    if room is None:
        return wanted
    return int(max(1, min(wanted, (room - MARGIN_MIN - keep) // (THREAD_ADDRESS_SPACE + per_thread))))


def release_heap() -> None:
    """Hand freed heap memory back to the operating system (glibc's
    ``malloc_trim``; a no-op where it is missing). Swapping weights frees and
    allocates many medium-sized arrays; glibc keeps such freed blocks
    fragmented in its heap, and without a trim the resident size grew by
    about 100 MB per full weight swap on SmolLM2 (an out-of-memory kill
    after ~170 swaps)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None

__all__ = ["ENV_LIMIT", "Room", "address_space_room", "file_size_limit", "format_bytes", "memory_limit", "memory_room",
           "parse_size", "release_heap", "set_memory_limit", "system_room", "threads_that_fit"]
