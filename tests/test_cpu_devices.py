"""train.cpu_devices: JAX's CPU backend split into n devices before JAX starts (sharding.set_cpu_devices), and an
explicit XLA_FLAGS device count (a simulated mesh) wins over it."""

import os
import subprocess
import sys

import pytest

CODE = ("from infini_jax.sharding import choose_platform, set_cpu_devices\n"
        "choose_platform(); set_cpu_devices({n})\n"
        "import jax; print('devices', jax.device_count())\n")


@pytest.mark.parametrize("xla_flags, n, expected", [("", 2, 2), ("", 0, 1),
                                                    ("--xla_force_host_platform_device_count=8", 2, 8)])
def test_set_cpu_devices(xla_flags, n, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    r = subprocess.run([sys.executable, "-c", CODE.format(n=n)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"devices {expected}" in r.stdout
    assert ("not applied" in r.stdout) == (expected == 8)


def test_too_late_is_a_note_not_an_error(monkeypatch, capsys):
    import jax

    from infini_jax.sharding import set_cpu_devices

    jax.devices()  # the test session's backend is up (8 simulated devices)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    set_cpu_devices(2)
    assert "already in use" in capsys.readouterr().out
    assert jax.device_count() == 8
