"""How much memory a job may take on this machine, checked before it allocates: a file's
header can declare far more than the machine holds, and a conversion that finds out by
running would be killed by the kernel's OOM killer, taking the daemon with it."""

from __future__ import annotations

import os

from ..registry.errors import InvalidModel

GiB = 1 << 30
SHARE = 0.8  # of the memory available now that one conversion may hold


def available_ram() -> int:
    """Bytes of RAM available now (MemAvailable), or all of it where that is unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - every POSIX system has these
        return 1 << 62


def check_memory(needed: int, what: str) -> None:
    """Refuses (InvalidModel, a 400) a job that would hold ``needed`` bytes when the
    machine cannot give it that much."""
    room = int(available_ram() * SHARE)
    if needed > room:
        raise InvalidModel(
            f"{what} needs {needed / GiB:.2f} GiB of memory; {room / GiB:.2f} GiB is available"
        )
