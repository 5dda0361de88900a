"""The one guard for optional extras in tests.

On a developer's machine a missing extra skips the test, and the skip says how to install it; in
CI (``CI=true``) every extra is installed by ``.ci/run``, so a missing one fails the test instead.
"""

from __future__ import annotations

import importlib
import os

import pytest

# module -> how to get it (README's test command installs all but ffcv, which needs Debian packages)
INSTALL = {
    "ffcv": "apt-get install pkg-config libturbojpeg0-dev libopencv-dev, then pip install -e '.[ffcv]'",
    "deepspeed": "pip install -e '.[test]' (or '.[deepspeed]')",
    "pycocotools": "pip install -e '.[test]' (or '.[dense]')",
    "scipy": "pip install -e '.[test]' (or '.[classify]')",
    "simplejpeg": "pip install -e '.[test]' (or '.[simplejpeg]')",
    "webdataset": "pip install -e '.[test]' (or pip install webdataset)",
    "wids": "pip install -e '.[test]' (or pip install wids)",
}
for _m in ("mmengine", "mmcv", "mmdet", "mmseg"):
    INSTALL[_m] = "pip install -e '.[test]' (or '.[openmmlab]')"


def need(module: str):
    """Import an optional extra: skip when it is missing (fail in CI)."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        how = INSTALL.get(module.split(".")[0], "pip install -e '.[test]'")
        pytest.skip(f"optional extra {module} is not installed ({e}); to run this test: {how}")
