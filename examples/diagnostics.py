"""Diagnostics: is the preconditioner healthy? The quickstart MLP under three settings.

Run with

    pip install -e ".[examples]" && python examples/diagnostics.py [--steps N] [--out-dir DIR]

Trains the quickstart's digits MLP with `psgd_eqx.kron(track_diagnostics=True)` three ways,
takes a `psgd_eqx.diagnostics` snapshot every few steps, and draws each run with
`psgd_eqx.plot_diagnostics`:

- `defaults`: kron's defaults (lr 1e-3): healthy until the MLP has memorised its
  training set (loss ≈ 0), when the gradients become tiny and erratic;
- `lr_too_high`: lr 3e-2, 30× the quickstart's: the update clip sets the step size on most
  steps (`clipped`), and the update RMS before clipping sits far above 1;
- `stale`: a refit every 200 steps only (`preconditioner_update_probability=0.005`):
  the fit residual ρ drifts away from 0 between refits.

It prints, per run, the final test accuracy and a one-line summary of the last snapshot.
"""

import argparse
import os

import equinox as eqx
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import psgd_eqx


try:  # run as a script (examples/ on the path) or imported by the tests
    import quickstart as qs
except ImportError:  # pragma: no cover
    import importlib.util
    import pathlib

    _spec = importlib.util.spec_from_file_location(
        "quickstart", pathlib.Path(__file__).with_name("quickstart.py"))
    qs = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(qs)


SETTINGS = {
    "defaults": dict(learning_rate=1e-3),
    "lr_too_high": dict(learning_rate=3e-2),
    "stale": dict(learning_rate=1e-3, preconditioner_update_probability=0.005),
}


def run(setting: str, steps: int, every: int, progress: bool = True):
    """Train one setting; return `(test accuracy, steps, snapshots)`."""
    x_train, y_train, x_test, y_test = qs.load_data()
    params, static = eqx.partition(qs.make_model(jax.random.PRNGKey(qs.SEED)), eqx.is_array)
    opt = psgd_eqx.kron(track_diagnostics=True, **SETTINGS[setting])
    state = opt.init(params)

    @eqx.filter_jit
    def step(params, state, key):
        idx = jax.random.randint(key, (qs.BATCH_SIZE,), 0, x_train.shape[0])

        def loss(p):
            return qs.loss_fn(eqx.combine(p, static), x_train[idx], y_train[idx])

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    key = jax.random.PRNGKey(1)
    at, snapshots = [], []
    for t in tqdm(range(steps), desc=setting, disable=not progress):
        params, state, _ = step(params, state, jax.random.fold_in(key, t))
        if (t + 1) % every == 0 or t == 0:
            at.append(t + 1)
            snapshots.append(psgd_eqx.diagnostics(state))  # on device; read when plotted
    _, acc = qs.evaluate(eqx.combine(params, static), x_test, y_test)
    return float(acc), at, snapshots


def summary(snapshot: dict) -> str:
    """The last snapshot in one line: worst conditioning, median update RMS, share of
    clipped tensors, mean |ρ|."""
    snap = jax.device_get(snapshot)
    cond = max(float(np.nanmax(np.asarray(c))) for d in snap.values() for c in d.conditioning)
    rms = float(np.median([np.mean(d.update_rms) for d in snap.values()]))
    clipped = float(np.mean([np.mean(d.clipped) for d in snap.values()]))
    rho = float(np.mean([np.mean(np.abs(d.fit_residual)) for d in snap.values()]))
    return (f"max conditioning {cond:.3g}, median update RMS {rms:.3g}, "
            f"clipped {clipped:.0%}, mean |ρ| {rho:.3g}")


def main(steps: int = 600, out_dir: str | None = ".", progress: bool = True,
         settings=tuple(SETTINGS)) -> dict:
    """Train each setting and plot its diagnostics to `out_dir/diagnostics_<setting>.png`.

    **Returns:** `{setting: {"test_acc", "steps", "snapshots"}}`.
    """
    every = max(1, steps // 60)
    results = {}
    for name in settings:
        acc, at, snaps = run(name, steps, every, progress)
        results[name] = dict(test_acc=acc, steps=at, snapshots=snaps)
        print(f"{name:>12}: test accuracy {acc:.3f}; {summary(snaps[-1])}")
        if out_dir is not None:
            out = os.path.join(out_dir, f"diagnostics_{name}.png")
            psgd_eqx.plot_diagnostics(snaps, at, out, max_paths=6,
                                      title=f"digits MLP, kron: {name.replace('_', ' ')}")
            print(f"{'':>12}  saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (600)")
    parser.add_argument("--out-dir", default=".", help="where to save the PNGs")
    args = parser.parse_args()
    main(steps=args.steps, out_dir=args.out_dir)
