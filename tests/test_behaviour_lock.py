"""Every alias computes what it computed before the redesign (see `tests/behaviour_lock.py`).

Four cases run by default (kron, scanned kron, a mixed psgd with a global group, Newton
xmat); the whole set (29 optimizers, ~4 min of compiling on 2 cores) with
`pytest -m slow tests/test_behaviour_lock.py`.
"""

import pathlib

import numpy as np
import pytest

from . import behaviour_lock as lock


_DATA = pathlib.Path(__file__).parent / "data" / "behaviour_lock.npz"
_FAST = {"kron", "kron_scanned", "psgd_mixed", "newton_xmat"}


def _params(names):
    return [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _params(list(lock.cases())))
def test_alias_matches_recorded_behaviour(name):
    recorded = np.load(_DATA)
    prefix = f"{name}/"
    want = {k[len(prefix):]: recorded[k] for k in recorded.files if k.startswith(prefix)}
    assert want, f"no recorded results for {name}"
    got = lock.run(name, lock.cases()[name])
    params = sorted(k for k in want if k.startswith("p"))
    assert sorted(k for k in got if k.startswith("p")) == params
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=f"{name} {k}")
    # the state: same array leaves (layout), same values
    states = sorted(k for k in want if k.startswith("s_"))
    assert sorted(k for k in got if k.startswith("s_")) == states, f"{name}: state layout"
    for k in states:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
