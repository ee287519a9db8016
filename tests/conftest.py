"""Shared test setup: everything runs offline and quietly (tests/README.md)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# One OpenMP thread in every process a test starts (subprocesses inherit the environment):
# the tests' models are tiny, and more threads oversubscribe a busy 2-core machine.
os.environ["OMP_NUM_THREADS"] = "1"

from hypothesis import settings  # noqa: E402

# No example database on disk (the repo stays clean) and no per-example deadline (2-core CI).
settings.register_profile("minddspo", database=None, deadline=None)
settings.load_profile("minddspo")

# ---------------------------------------------------------------- text-to-image fixtures
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `import bench` works whatever the pytest import mode
    sys.path.insert(0, str(ROOT))


class _TouchOnUnpickle:
    """Pickled, this object is a call of ``os.system``: unpickling it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def touch_on_unpickle():
    """``make(marker)``: an object whose unpickling creates the file ``marker`` (what a
    crafted pickle could do); a test asserts the marker never appears."""
    return _TouchOnUnpickle


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole session (whatever the environment said before
    torch was imported); a test that needs more sets it and restores it."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models are as fast on one thread, and more
    threads oversubscribe a busy 2-core CI machine (10-50x slower measured)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """``save(name) -> Path``: a tiny random pipeline of backbone ``name`` (sd, sdxl, sana)
    saved once per session in diffusers layout, for ``load_backbone`` and the trainer."""
    from bench.t2i.tiny import save_tiny_pipeline

    cache: dict[str, Path] = {}

    def save(name: str = "sd") -> Path:
        if name not in cache:
            cache[name] = save_tiny_pipeline(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return cache[name]

    return save


@pytest.fixture(scope="session")
def tiny_sd_dir(tiny_pipeline_dir) -> Path:
    """A tiny random SD-1.x pipeline directory (diffusers layout), saved once per session."""
    return tiny_pipeline_dir("sd")


@pytest.fixture
def spy_method_loss(monkeypatch):
    """``spy(module) -> calls``: wrap ``module.method_loss`` so every call is recorded as
    ``(method, kwargs, output)`` and still computed by the real method table."""

    def install(module):
        calls = []
        real = module.method_loss

        def spy(method, **kw):
            out = real(method, **kw)
            calls.append((method, kw, out))
            return out

        monkeypatch.setattr(module, "method_loss", spy)
        return calls

    return install
