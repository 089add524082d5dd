"""Process-wide performance settings: what hefl's command line applies before it works, and what
a program calling hefl's API may apply itself.

``small_pages()``: numpy asks the kernel for transparent huge pages for every array of 4 MiB or
more (``madvise(MADV_HUGEPAGE)``). A round allocates fresh arrays the size of the model for
every client (the delta, the weighted or packed update), and where the kernel compacts memory
to find 2 MiB pages on demand (``/sys/kernel/mm/transparent_hugepage/defrag`` set to
``madvise``, the default of many distributions and of the machines we benchmark on) each such
array costs several times its arithmetic: 140 ms instead of 30 ms for a fresh 53 MB array of a
FEMNIST update (BENCHMARKS.md, "Huge pages").
"""

from __future__ import annotations

import os

#: numpy's own switch, read when numpy is imported (so it also reaches child processes).
ENV = "NUMPY_MADVISE_HUGEPAGE"


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
