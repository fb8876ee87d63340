"""Who drives a run: host, pid and start time of the driver process, as MLflow tags on every run it creates.

pid numbers are reused; the process start time from /proc tells a reused pid from the original driver.
"""

from __future__ import annotations

import os
import socket

HOST_TAG = "superweights.driver_host"
PID_TAG = "superweights.driver_pid"
STARTED_TAG = "superweights.driver_started"  # /proc/<pid>/stat start time (clock ticks since boot)


def _process_start(pid: int) -> str | None:
    """The process's start time from /proc, or None when no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may hold spaces, so count from its closing ')'
    return text.rsplit(")", 1)[1].split()[19]


def driver_tags() -> dict[str, str]:
    """Tags that identify this process as the run's driver."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), STARTED_TAG: _process_start(pid) or ""}


def driver_alive(tags: dict) -> bool | None:
    """True/False for a driver on this host; None when it ran elsewhere (or recorded nothing)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    if not os.path.isdir("/proc"):
        return None  # no way to tell here
    started = _process_start(int(tags[PID_TAG]))
    return started is not None and (not tags.get(STARTED_TAG) or started == tags[STARTED_TAG])
