"""The quickstart example runs end to end (few steps) and reports sane numbers."""

import importlib.util
import math
import pathlib

import jax
import optax


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _adam_with_standard_promotion(*args, **kwargs):
    # optax.adam itself is not clean under jax_numpy_dtype_promotion="strict" (optax 0.2.8:
    # its bias correction computes `b1 ** count` with a Python float and an int32 count).
    # Only Adam's update runs under standard promotion; the example's own code (model,
    # loss, train step, evaluation) and psgd_eqx.kron stay under the suite's strict mode.
    opt = _original_adam(*args, **kwargs)

    def update(updates, state, params=None, **extra):
        with jax.numpy_dtype_promotion("standard"):
            return opt.update(updates, state, params, **extra)

    return optax.GradientTransformation(opt.init, update)


_original_adam = optax.adam


def test_quickstart(tmp_path, monkeypatch):
    quickstart = _load("quickstart")
    monkeypatch.setattr(quickstart.optax, "adam", _adam_with_standard_promotion)
    out = tmp_path / "quickstart.png"
    results = quickstart.main(steps=30, out=str(out), progress=False)

    assert out.exists() and out.stat().st_size > 0
    assert set(results) == {"kron", "adam"}
    for r in results.values():
        acc = r["test_acc"]
        assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0
        assert math.isfinite(r["initial_loss"]) and math.isfinite(r["final_loss"])
        assert len(r["losses"]) == 30
    kron = results["kron"]
    assert kron["final_loss"] < kron["initial_loss"]
