"""Two processes of 4 CPU devices each train the sharded transformer as one 8-device
program (`examples/multiprocess_train.py --spawn 2`), and the loss curve is the
single-process 8-device run's (same global batches, same seeds).

Slow: every step synchronises the two processes through gloo over the loopback interface,
which takes seconds per step on a 2-core machine; run with `pytest -m slow`.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "multiprocess_train.py"
TINY = ["--d-model", "16", "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch", "16"]
STEPS = 4


@pytest.mark.slow
@pytest.mark.parametrize("owner", [False, True], ids=["placement", "owner"])
def test_two_processes_match_one(tmp_path, owner):
    """Both sharding modes; owner-computes' buckets here hold fewer stacks than the 8
    devices, so each device runs its own program (the packing) across the processes."""
    out = tmp_path / "result.json"
    env = dict(os.environ)
    # Halves XLA's CPU compile time; the launcher sets the device counts.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--spawn", "2", "--local-devices", "4", "--compare",
         "--steps", str(STEPS), "--timeout", "500", "--json", str(out), *TINY,
         *(["--owner"] if owner else [])],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["process_count"] == 2 and r["n_devices"] == 8
    multi, single = r["losses"], r["single_process_losses"]
    assert len(multi) == len(single) == STEPS
    assert all(math.isfinite(x) for x in multi)
    # The same program on the same 8 devices; only where the reductions run differs.
    # Measured: 4.8e-7 absolute (1.0e-7 relative) over 10 steps.
    for a, b in zip(multi, single):
        assert a == pytest.approx(b, rel=1e-4), (multi, single)
