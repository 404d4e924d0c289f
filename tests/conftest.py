"""Shared pytest setup: 8 simulated CPU devices.

XLA_FLAGS must be set before jax is imported anywhere, so this runs at conftest import time.
Nothing else is enabled globally (no x64, no platform override).
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_existing_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICE_FLAG not in _existing_flags.split():
    os.environ["XLA_FLAGS"] = f"{_existing_flags} {_DEVICE_FLAG}".strip()
