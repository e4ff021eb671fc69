"""What a process has used: its peak resident memory."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """The peak resident set size of this process's own address space, in bytes.

    Linux's `getrusage(...).ru_maxrss` also counts the address space a process had before its
    last exec: a child started by fork and exec (multiprocessing's spawn) inherits its parent's
    resident size at the fork, so a child of a large parent reports the parent's size. VmHWM
    (/proc/self/status) is the high-water mark of the current address space alone; elsewhere,
    ru_maxrss is the best there is.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """The resident set size of this process now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0
