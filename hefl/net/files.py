"""Files that hold secrets: written owner-only, and kept out of version control.

``write_private(path, data)`` creates (or truncates) a file with mode 0600 from the first byte
(never world-readable, even briefly). ``ignore_secrets(folder, patterns)`` writes
``folder/.gitignore`` naming the secret files in it, so that ``git add .`` in a project that
holds ``certs/`` or ``keys/`` cannot commit a CA key, a token or a key share.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

HEADER = "# written by hefl: secret files in this folder never go into version control\n"


def write_private(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with mode 0600 (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(p, 0o600)  # an existing file keeps its mode through O_CREAT: set it
    return p


def ignore_secrets(folder: str | Path, patterns: Sequence[str]) -> Path:
    """``folder/.gitignore`` listing ``patterns`` (kept lines of an existing one stay)."""
    p = Path(folder) / ".gitignore"
    have = p.read_text().splitlines() if p.exists() else [HEADER.strip()]
    lines = have + [x for x in patterns if x not in have]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return p


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) mode 0700; a folder that already exists keeps its mode
    (it may be one the operator chose, such as the working directory)."""
    p = Path(path)
    if not p.is_dir():
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(p, 0o700)  # mkdir's mode is masked by the umask
    return p


def private_file(path: str | Path) -> Path:
    """Make sure ``path`` exists and is mode 0600 (created empty if missing), before a library
    (SQLite, logging) opens it with the process umask."""
    p = Path(path)
    private_dir(p.parent)
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(p, 0o600)
    return p


def file_stamp(path: Path | None) -> tuple[int, int] | None:
    """What says a file changed: its size and mtime (None: no file)."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
