"""Where the compile time of a `kron` update goes: ablations of one compiled update.

The 16-layer tiny tree of `first_steps.py` (per layer {"w_in": (16, 32), "w_out": (32, 16),
"b": (32,)}; 3 buckets), `psgd_eqx.kron(1e-3, preconditioner_update_probability=1.0)`,
`jax.jit(opt.update).lower(...).compile()` in a fresh process per measurement, the
variants interleaved over `--reps` rounds; medians of wall and CPU seconds (lower +
compile). Variants replace one part of the step by a stub *in the child process only*
(nothing in the library changes), so the difference to `full` is what that part costs:

- `full`: the update as shipped;
- `no_probe`: the damped probe h = x + (δ + eps|x|)·v returns x (no Gaussian draw);
- `no_refit`: every preconditioner refit returns the preconditioner unchanged (probe,
    statistics, norm bounds and steps all gone; apply, momentum, clipping stay);
- `all_diag`: `max_skew_triangular=0` (every factor diagonal: no dense factor steps);
- `adam_train`: Adam's whole train step on the same tree (the issue's reference point).

    python benchmarks/compile_parts.py [--reps 3] [--layers 16]

Also prints the XLA CPU backend at `--xla_backend_optimization_level=0` for `full`, to
show how much of the compile is LLVM's optimisation of the fused kernels.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), ""))
import jax, jax.numpy as jnp, optax
import psgd_eqx, psgd_eqx._fit as fit
from first_steps import tiny_tree, tiny_grads, tiny_mlp_loss
variant, layers = sys.argv[2], int(sys.argv[3])
if variant == "no_probe":
    fit.damped_probe = lambda key, x, damping=1e-9, v=None: (x if v is None else v, x)
if variant == "no_refit":
    fit.fit_one = lambda q, key, x, v, s: q
params = tiny_tree(layers)
jax.jit(lambda a: a + 1.0).lower(1.0).compile()  # backend start-up, not timed
if variant == "adam_train":
    opt = optax.adam(1e-3)
    def fn(params, state, xb):
        loss, g = jax.value_and_grad(tiny_mlp_loss)(params, xb)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss
    args = (params, opt.init(params), jax.random.normal(jax.random.PRNGKey(1), (8, 16)))
else:
    kw = {"max_skew_triangular": 0} if variant == "all_diag" else {}
    opt = psgd_eqx.kron(1e-3, preconditioner_update_probability=1.0, **kw)
    fn, args = opt.update, (tiny_grads(params), opt.init(params), params)
w0, c0 = time.perf_counter(), time.process_time()
jax.jit(fn).lower(*args).compile()
print(json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}))
"""

VARIANTS = ("full", "no_probe", "no_refit", "all_diag", "adam_train", "full_O0")


def run(variant: str, layers: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    name = variant
    if variant == "full_O0":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0")
        name = "full"
    here = os.path.abspath(__file__)
    out = subprocess.run([sys.executable, "-c", CHILD, here, name, str(layers)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    a = ap.parse_args(argv)
    times: dict = {v: [] for v in VARIANTS}
    for r in range(a.reps):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            times[v].append(run(v, a.layers))
            print(f"rep {r} {v}: {times[v][-1]['wall']:.2f} s", file=sys.stderr, flush=True)
    med = {v: {k: statistics.median(t[k] for t in ts) for k in ("wall", "cpu")}
           for v, ts in times.items()}
    adam = med["adam_train"]["wall"]
    print(f"| variant ({a.layers} layers) | lower + compile wall s | CPU s | × adam train step "
          "(wall) | vs full (wall) |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        m = med[v]
        print(f"| {v} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['wall'] / adam:.2f}× | "
              f"{m['wall'] - med['full']['wall']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
