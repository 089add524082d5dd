"""hefl.tuning: the process-wide settings the command line applies (run in fresh interpreters:
they change process state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# numpy's switch returns its previous state: set it back at once, so reading does not change it
PROBE = """
import json, os, subprocess, sys
import numpy as np
from numpy._core.multiarray import _set_madvise_hugepage as switch
def state():
    was = switch(True)
    switch(was)
    return was
before = state()
from hefl.tuning import small_pages
small = small_pages()
child = subprocess.run([sys.executable, "-c", "import numpy._core.multiarray as m; "
                        "w = m._set_madvise_hugepage(True); print(int(w))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({"before": before, "small": small, "after": state(),
                  "env": os.environ.get("NUMPY_MADVISE_HUGEPAGE"), "child": child == "1"}))
"""


def _probe(env: dict[str, str]) -> dict:
    pytest.importorskip("numpy._core.multiarray")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    return {**env, **extra}


def test_small_pages_turns_huge_pages_off_here_and_in_child_processes():
    got = _probe(_env())
    assert got["small"] is True
    assert got["after"] is False  # this process
    assert got["child"] is False  # a process it starts (a helper, a Ray worker)
    assert got["env"] == "0"


def test_small_pages_leaves_a_setting_the_user_made():
    got = _probe(_env(NUMPY_MADVISE_HUGEPAGE="1"))
    assert got["small"] is False
    assert got["after"] == got["before"]  # numpy's own choice for "1" (and this kernel) stands
    assert got["env"] == "1"


def test_the_command_line_applies_it(tmp_path):
    code = ("import os, json; from typer.testing import CliRunner; from hefl.cli import app; "
            "r = CliRunner().invoke(app, ['status', '--help']); "
            "import numpy._core.multiarray as m; w = m._set_madvise_hugepage(True); "
            "print(json.dumps([r.exit_code, w, os.environ.get('NUMPY_MADVISE_HUGEPAGE')]))")
    pytest.importorskip("numpy._core.multiarray")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, False, "0"]
