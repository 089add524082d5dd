import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """../shared/data beside the project (or $HEFL_SHARED_DATA)."""
    return Path(os.environ.get("HEFL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def need_data(sub: str) -> Path:
    p = shared_data() / sub
    if not p.exists():
        pytest.skip(f"real data set {sub!r} not found at {p}; it lives in ../shared/data")
    return p


@pytest.fixture(autouse=True, scope="session")
def _torch_single_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, whatever an earlier test set (float64 equivalences and
    timings of the backends assume it); the previous count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
