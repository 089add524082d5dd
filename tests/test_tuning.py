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


# Page faults of a fresh 64 MiB array, then of another one after the first is freed: with the
# freed block reused the second is already mapped and faults (almost) nowhere.
FAULTS = """
import json, os, resource, subprocess, sys
import numpy as np
from hefl.tuning import reuse_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(8 << 20)  # 64 MiB, every page touched
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
on = reuse_freed_memory() if sys.argv[1] == "on" else None
first, second = faults(), faults()
print(json.dumps({"on": on, "first": first, "second": second,
                  "env": os.environ.get("MALLOC_MMAP_THRESHOLD_")}))
"""


def _faults(mode: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc_env(**extra: str) -> dict[str, str]:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("reuse_freed_memory tunes glibc's malloc")
    drop = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"}
    return {**{k: v for k, v in _env().items() if k not in drop}, **extra}


def test_reuse_freed_memory_maps_a_freed_large_block_once():
    off = _faults("off", _glibc_env())
    on = _faults("on", _glibc_env())
    assert off["first"] >= 16 and on["first"] >= 16  # the first array did fault its pages in
    assert off["second"] > off["first"] // 2  # by default: mapped afresh, faulted again
    assert on["on"] is True and on["second"] <= on["first"] // 10  # reused
    assert on["env"] == str(256 << 20)  # and the processes it starts get the same setting


def test_a_child_process_inherits_the_setting():
    # the child runs without calling it, under the variables the parent set
    env = _glibc_env(MALLOC_MMAP_THRESHOLD_=str(256 << 20),
                     MALLOC_TRIM_THRESHOLD_=str(512 << 20))
    got = _faults("off", env)
    assert got["second"] <= got["first"] // 10


def test_reuse_freed_memory_leaves_a_setting_the_user_made():
    got = _faults("on", _glibc_env(MALLOC_MMAP_THRESHOLD_=str(1 << 20)))
    assert got["on"] is False and got["env"] == str(1 << 20)
    assert got["second"] > got["first"] // 2  # the user's 1 MiB threshold stands


def test_the_command_line_reuses_freed_memory():
    code = ("import os; from typer.testing import CliRunner; from hefl.cli import app; "
            "r = CliRunner().invoke(app, ['status', '--help']); "
            "print(r.exit_code, os.environ.get('MALLOC_MMAP_THRESHOLD_'))")
    out = subprocess.run([sys.executable, "-c", code], env=_glibc_env(), capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.split()[-2:] == ["0", str(256 << 20)]
