"""Process-wide performance settings: what hefl's command line applies before it works, and what
a program calling hefl's API may apply itself.

``small_pages()``: numpy asks the kernel for transparent huge pages for every array of 4 MiB or
more (``madvise(MADV_HUGEPAGE)``). A round allocates fresh arrays the size of the model for
every client (the delta, the weighted or packed update), and where the kernel compacts memory
to find 2 MiB pages on demand (``/sys/kernel/mm/transparent_hugepage/defrag`` set to
``madvise``, the default of many distributions and of the machines we benchmark on) each such
array costs several times its arithmetic: 140 ms instead of 30 ms for a fresh 53 MB array of a
FEMNIST update (BENCHMARKS.md, "Huge pages").

``reuse_freed_memory()``: glibc's malloc maps every block above its mmap threshold afresh and
unmaps it on free. The threshold adapts only up to 32 MiB, so each model-sized temporary of a
larger model (53 MB for FEMNIST's 6.6 M float64 values) is a new mapping whose every 4 KiB
page faults in, zeroed, again and again. Raising the threshold to ``MMAP_THRESHOLD`` (and the
top-of-heap trim threshold to twice that, as glibc's own adaptation does) lets freed blocks be
reused: the process may keep up to that much freed memory mapped.
"""

from __future__ import annotations

import os

#: numpy's own switch, read when numpy is imported (so it also reaches child processes).
ENV = "NUMPY_MADVISE_HUGEPAGE"

#: Blocks up to this size come from (and go back to) malloc's heap, not fresh mappings.
MMAP_THRESHOLD = 256 << 20
#: glibc's variables for the same settings, read when a process starts (children too).
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def small_pages() -> bool:
    """Stop numpy from asking for huge pages in this process and in the processes it starts
    (helpers, Ray workers: through ``NUMPY_MADVISE_HUGEPAGE=0``). A value the user set for that
    variable is left as it is. Returns whether numpy now uses small pages."""
    if ENV in os.environ:
        return os.environ[ENV].strip() == "0"
    os.environ[ENV] = "0"
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2 or 1
    switch = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if switch is None:  # another numpy: the variable still reaches the children
        return False
    switch(False)
    return True


def reuse_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks up to ``MMAP_THRESHOLD`` in this process and in
    the processes it starts (through ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``).
    Settings the user made (either variable, or ``GLIBC_TUNABLES``) are left as they are, as is
    a process not on glibc. Returns whether this process now uses the larger thresholds."""
    import ctypes
    import platform

    if any(v in os.environ for v in (*MALLOC_ENV, "GLIBC_TUNABLES")):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)):
        return False
    os.environ[MALLOC_ENV[0]] = str(MMAP_THRESHOLD)
    os.environ[MALLOC_ENV[1]] = str(2 * MMAP_THRESHOLD)
    return True
