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
show how much of the compile is LLVM's optimisation of the fused kernels. `--before
NAME=DIR` adds `full` with another commit's library (exported to DIR) to the same
interleaved run, for a before/after:

    git archive REV psgd_eqx | tar -x -C benchmarks/out/lib_REV
    python benchmarks/compile_parts.py --variants full --before REV=benchmarks/out/lib_REV
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


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
print(json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0,
                  "lib": os.path.dirname(psgd_eqx.__file__)}))
"""

VARIANTS = ("full", "no_probe", "no_refit", "all_diag", "adam_train", "full_O0")


def run(variant: str, layers: int, libs: dict | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    name = variant
    if "@" in variant:  # `full@NAME`: the library exported to the folder libs[NAME]
        name, lib = variant.split("@")
        env["PYTHONPATH"] = os.path.abspath(libs[lib])
    if variant == "full_O0":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0")
        name = "full"
    here = os.path.abspath(__file__)
    # run outside the checkout, so that `import psgd_eqx` is the installed library or
    # the PYTHONPATH one, never the working directory's
    out = subprocess.run([sys.executable, "-c", CHILD, here, name, str(layers)], env=env,
                         capture_output=True, text=True, timeout=600, check=True,
                         cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of the variants (adam_train is always run)")
    ap.add_argument("--before", action="append", default=[], metavar="NAME=DIR",
                    help="also time `full` with the library exported to DIR (e.g. `git "
                         "archive REV psgd_eqx | tar -x -C DIR`), as the variant full@NAME: "
                         "a before/after in the same run")
    a = ap.parse_args(argv)
    libs = dict(b.split("=", 1) for b in a.before)
    variants = tuple(dict.fromkeys([*a.variants.split(","), "adam_train",
                                    *(f"full@{n}" for n in libs)]))
    times: dict = {v: [] for v in variants}
    for r in range(a.reps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            times[v].append(run(v, a.layers, libs))
            print(f"rep {r} {v}: {times[v][-1]['wall']:.2f} s", file=sys.stderr, flush=True)
    med = {v: {k: statistics.median(t[k] for t in ts) for k in ("wall", "cpu")}
           for v, ts in times.items()}
    adam = med["adam_train"]["wall"]
    print(f"| variant ({a.layers} layers) | lower + compile wall s | CPU s | × adam train step "
          "(wall) | vs full (wall) |")
    print("|---|---|---|---|---|")
    for v in variants:
        m = med[v]
        print(f"| {v} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['wall'] / adam:.2f}× | "
              f"{m['wall'] - med.get('full', m)['wall']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
