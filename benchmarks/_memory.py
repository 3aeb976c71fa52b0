"""Peak memory of the current process, shared by the benchmark scripts."""

from __future__ import annotations

import resource


def peak_rss(reset: bool = False) -> int:
    """Peak resident memory of this process in bytes; with ``reset``, restart it from now.

    Linux keeps ``ru_maxrss`` across ``exec``, so a child started by a large parent reports
    the parent's peak. ``VmHWM`` belongs to the new address space, and writing 5 to
    ``clear_refs`` resets it to the current RSS: the difference is the peak of the call alone.
    """
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
