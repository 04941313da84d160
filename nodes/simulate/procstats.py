"""Peak memory and I/O counters of processes, read from /proc (Linux)."""

from typing import Optional


def _read_status_kib(pid: "int | str", field: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss(pid: "int | str" = "self") -> Optional[int]:
    """Peak resident set size of a process in bytes (None if it cannot be read)."""
    kib = _read_status_kib(pid, "VmHWM")
    return kib * 1024 if kib is not None else None


def io_counters(pid: "int | str" = "self") -> dict[str, int]:
    """Bytes a process passed to read-like (rchar) and write-like (wchar) calls, sockets included."""
    counters: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/io") as io:
            for line in io:
                key, _, value = line.partition(":")
                if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
                    counters[key] = int(value)
    except (OSError, ValueError):
        pass
    return counters


def cpu_ticks(pid: "int | str" = "self") -> Optional[int]:
    """User plus system CPU time a process has used so far, in clock ticks (None if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu_ticks() -> Optional[tuple[int, int, int]]:
    """Clock ticks all cores spent busy, of them in the kernel, and in all, since boot (None if unreadable)."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    kernel = system + irq + softirq
    busy = user + nice + kernel + steal  # guest time is counted within user
    return busy, kernel, busy + idle + iowait
