import os
import shutil
import socket
import sys

# Never reach for a hub in tests: a pretrained load must fail fast with the lab's own message.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU, lab/engines/fused.py's Triton kernels run through Triton's CPU interpreter (set before triton loads).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from lab import engines  # noqa: E402
from lab.spec import VariantSpec  # noqa: E402

TINY_CSM = VariantSpec(family="csm", name="csm-tiny", weights="tiny", first_chunk_frames=1, chunk_growth=2.0,
                       max_chunk_frames=4)


@pytest.fixture(scope="session")
def csm_tiny():
    return engines.build(TINY_CSM)


@pytest.fixture(scope="session")
def hibari_engine():
    return engines.build(VariantSpec(family="hibari", name="hibari"))


@pytest.fixture(scope="session")
def hibari_trim_engine():
    return engines.build(VariantSpec(family="hibari", name="hibari-trim", leading_silence="trim"))


# Browser tests drive Debian's chromium through Playwright (`playwright install` cannot download here).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
