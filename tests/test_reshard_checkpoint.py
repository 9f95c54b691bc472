"""An Orbax checkpoint of the sharded params and optimizer state, saved from an 8-device
mesh, restores onto 4 devices and onto 1, and the next update there is the update that the
uninterrupted 8-device run makes. The code sample of docs/guides/scaling.md ("Checkpoints
that reshard") restores onto 4 devices too.

The checks need 8 simulated CPU devices, and XLA reads that count when its CPU backend
starts, which has already happened in the pytest process; so they run in
tests/reshard_checkpoint_worker.py, in a subprocess, which prints a JSON summary.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = pathlib.Path(__file__).with_name("reshard_checkpoint_worker.py")
# Float32 rounding: the 4- and 1-device programs sum in another order than the 8-device one
# (measured: at most 4.5e-7 of a leaf's largest entry, for the update and the new state).
RTOL = 1e-5


@pytest.mark.slow  # default-suite time budget; run with -m slow
def test_checkpoint_restores_onto_fewer_devices(tmp_path):
    env = dict(os.environ)
    # The second flag halves XLA's CPU compile time, most of this test's time.
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["devices"] == 8
    assert sorted(out["restored"]) == ["1", "4"]
    for n, r in out["restored"].items():
        assert r["same_structure"], n
        # every leaf landed with the sharding computed for the new mesh, on its devices only
        assert r["shardings_as_asked"], n
        assert r["devices_used"] == list(range(int(n))), r["devices_used"]
        assert r["restored_vs_saved"] == [0.0, 0.0], r["restored_vs_saved"]
        # [max abs difference, max of it relative to the leaf's largest entry]
        assert r["update_diff"][1] < RTOL, (n, r["update_diff"])
        assert r["state_diff"][1] < RTOL, (n, r["state_diff"])
    # the guide's sample, run on the same 8-device params and state
    guide = out["guide_sample"]
    assert guide["saved_under_workdir"]
    assert guide["devices_used"] == [0, 1, 2, 3]
    assert guide["restored_vs_saved"] == [0.0, 0.0]
