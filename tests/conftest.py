"""Shared pytest setup: 8 simulated CPU devices, CPU backend, and the ../shared test data location.

XLA_FLAGS must be set before jax is imported anywhere, so this runs at conftest import time.
JAX_PLATFORMS defaults to cpu (libtpu may be installed for ahead-of-time TPU compiles; it must not try
to grab a TPU here). Nothing else is enabled globally (no x64).
"""

import os
from pathlib import Path

import pytest

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_existing_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICE_FLAG not in _existing_flags.split():
    os.environ["XLA_FLAGS"] = f"{_existing_flags} {_DEVICE_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the checkout (test corpus); tests that need it skip where it is absent."""
    if not (SHARED / "corpus").is_dir():
        pytest.skip(f"needs the shared test corpus at {SHARED}/corpus (absent in this checkout)")
    return SHARED


# CI (.ci/run sets INFINI_FAIL_ON_SKIP=1) installs every extra and has ../shared, so no skip applies there: a
# skipped test would be a check silently not run, and fails the session.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")


def pytest_sessionfinish(session, exitstatus):
    if _skipped and os.environ.get("INFINI_FAIL_ON_SKIP") == "1":
        print("\nINFINI_FAIL_ON_SKIP: these tests were skipped, which CI does not allow:\n  " + "\n  ".join(_skipped))
        session.exitstatus = 1
