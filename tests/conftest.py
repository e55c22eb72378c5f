"""Shared pytest set-up. Heavier fixtures live in tests/fixtures_*.py: the session ones (S3 server, the
demo run) are registered below; the module-scoped Ray cluster is imported by the modules that use it."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES_RAW = ROOT / "fixtures" / "raw"
REAL_DATA = ROOT.parent / "shared" / "data" / "real"
ARTIFACTS = ROOT / "test-artifacts"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
sys.path.insert(0, str(ROOT))

# the session fixtures, registered here rather than imported by each module that uses them: a
# session fixture imported into two modules runs once per module
from tests.fixtures_demo import demo_run  # noqa: E402,F401
from tests.fixtures_s3 import s3_server  # noqa: E402,F401



def pytest_addoption(parser):
    parser.addoption("--gpu-image", action="store_true",
                     help="also build the GPU image (containers/Dockerfile: ~6 GB of CUDA wheels, ~5 min cold); "
                          "`make test-gpu-image`")


def pytest_collection_modifyitems(config, items):
    # The GPU image's build is opt-in (deselected, not skipped): its CUDA wheels take longer to fetch than
    # the rest of CI together; the CPU image is built and run in every `make test`.
    if not config.getoption("--gpu-image"):
        chosen = [i for i in items if "gpu_image" not in i.keywords]
        if len(chosen) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if "gpu_image" in i.keywords])
            items[:] = chosen
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def fixtures_raw() -> Path:
    return FIXTURES_RAW


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.exists():
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA
