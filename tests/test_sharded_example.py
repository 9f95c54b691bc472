"""The sharded-transformer example trains on 8 simulated CPU devices and shards its state.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before JAX initialises
its backends, which pytest has already done, so the example runs in a subprocess.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sharded_transformer.py"
# Small enough that compilation plus 30 steps takes about 25 s on 2 CPU cores.
SMALL = ["--d-model", "32", "--layers", "2", "--heads", "4", "--seq-len", "32", "--batch", "16"]


def _run(tmp_path, devices: int, steps: int = 30) -> dict:
    out = tmp_path / f"result_{devices}.json"
    env = dict(os.environ)
    # The second flag halves XLA's CPU compile time (most of this test's time) at the
    # cost of slower steps, which do not matter here.
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", str(steps), "--devices", str(devices),
         "--lr", "3e-3", "--json", str(out), *SMALL],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # default-suite time budget; run with -m slow
def test_sharded_transformer_8_devices(tmp_path):
    r = _run(tmp_path, devices=8)
    losses = r["losses"]
    assert r["n_devices"] == 8
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    # From about log(103) = 4.6; the mean of the last 5 steps is well below the start.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert r["step_ms"] > 0
    assert "| **total** |" in r["plan"]
    # The optimizer state really is split over the devices: no device holds more than a
    # quarter of it (perfect FSDP sharding over 8 devices would be an eighth).
    assert r["state_bytes_per_device"] < r["state_bytes_total"] / 4
