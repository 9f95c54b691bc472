"""Adaptive refits vs the anneal and fixed probabilities: refits spent for the loss reached.

Schedules (`preconditioner_update_probability` of `psgd_eqx.kron`, everything else at its
default): `p=1`, psgd_jax's anneal `precond_update_prob_schedule()` (kron's default),
`p=0.1`, and `adaptive_refit_schedule(tolerance=...)` (floor 0.03, ceiling 1, β 0.9;
`--tolerances`, 0.5 is the default), which refits at a rate set by how far P is from
fitting the recent inputs; after each adaptive run, a fixed probability that spends the
same number of refits (the comparison at equal refit cost).

Problems:

- `rotating`: a drifting quadratic, ½·tr((W − W*)ᵀ H_t (W − W*)) for W of 32×16, with
  H_t = R_t diag(λ) R_tᵀ, λ log-spaced over 1e-2…1e2 and R_t a rotation turning by
  `--omega` rad per step (a fixed random rotation generator), W* jumping to a new random
  point every 500 steps (so there is always something left to learn), gradient noise
  1e-3; loss = mean exact loss over each segment's last 100 steps, averaged;
- `quadratic`: benchmarks/kron_quadratic.py's fixed Kronecker quadratic (cond ≈ 1e6,
  noisy gradients); mean exact loss over the last 100 steps;
- `digits`: the quickstart MLP (batch 64); test accuracy and full-train loss;
- `xor` (only with `--only xor`): examples/delayed_xor.py at its best lr with the
  reference's every-step refits, the anneal and the adaptive schedule (refits per seed).

Each (schedule, lr, seed) is trained in one vmapped `lax.scan` per schedule (one compile);
per schedule the best lr (by the problem's metric, mean over seeds) is reported with the
refits it used. Refits are counted in the state (`PSGDState.refits`).

Usage:

    python benchmarks/adaptive_refits.py --quick    # smoke (< 2 min)
    python benchmarks/adaptive_refits.py            # full (≈ 15 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(os.path.dirname(_HERE), "examples")]

from _common import lib_commit  # noqa: E402
from defaults import digits_problem, quadratic_problem  # noqa: E402

import psgd_eqx  # noqa: E402


SCHEDULES = {
    "p=1": 1.0,
    "anneal (default)": psgd_eqx.precond_update_prob_schedule(),
    "p=0.1": 0.1,
}


@dataclasses.dataclass
class Problem:
    name: str
    title: str
    data: dict
    init: Callable
    loss_grad: Callable  # (params, key, data, t) -> (loss, grads)
    evaluate: Callable  # (params, data, t) -> f32[m]
    eval_names: tuple[str, ...]
    primary: str
    higher_better: bool
    steps: int
    lrs: tuple[float, ...]
    seeds: int
    window: int = 0  # primary = mean per-step loss over the last `window` steps of a segment
    segment: int = 0  # segments of this many steps (0 = one)


def rotating_problem(q: bool, omega: float) -> Problem:
    n, m, seg = 32, 16, 500
    lam = jnp.logspace(-2.0, 2.0, n)
    a = jax.random.normal(jax.random.PRNGKey(7), (n, n))
    gen = (a - a.T) / jnp.sqrt(2.0 * n)  # skew-symmetric, eigenvalues O(1)

    def hessian(t):
        r = jax.scipy.linalg.expm(omega * t * gen)
        return (r * lam) @ r.T

    def target(t):
        return jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(11), t // seg), (n, m))

    def exact_loss(w, t):
        d = w["w"] - target(t)
        return 0.5 * jnp.sum(d * (hessian(t) @ d))

    def loss_grad(params, key, data, t):
        del data
        h = hessian(t)
        d = params["w"] - target(t)
        g = h @ d + 1e-3 * jax.random.normal(key, d.shape)
        return 0.5 * jnp.sum(d * (h @ d)), {"w": g}

    def evaluate(params, data, t):
        del data
        return jnp.stack([exact_loss(params, t)])

    steps = 1000 if q else 3000
    return Problem("rotating", f"rotating quadratic (W 32×16, cond 1e4, ω = {omega} rad/step, "
                   f"W* jumps every {seg} steps)", {}, lambda key: {"w": jnp.zeros((n, m))},
                   loss_grad, evaluate, ("loss",), "loss (segment ends)", False, steps,
                   (0.01, 0.03) if q else (0.003, 0.01, 0.03), 2, window=100,
                   segment=seg)


def _wrap(pb) -> Problem:
    """A problem of benchmarks/defaults.py, with the step count passed through."""
    return Problem(pb.name, pb.title, pb.data, pb.init,
                   lambda p, k, d, t: pb.loss_grad(p, k, d),
                   lambda p, d, t: pb.evaluate(p, d), pb.eval_names,
                   pb.eval_names[0] if not pb.window else pb.primary, pb.higher_better,
                   pb.steps, pb.lrs, pb.seeds, window=pb.window)


def train(pb: Problem, schedule, lrs, seeds: int):
    """All (lr, seed) runs of one schedule: losses (runs, steps), final evals (runs, m),
    refits (runs,)."""
    grid = [(lr, sd) for lr in lrs for sd in range(seeds)]

    def one(lr, seed, data):
        k_init, k_data = jax.random.split(jax.random.PRNGKey(1000 + seed))
        params = pb.init(k_init)
        opt = psgd_eqx.kron(learning_rate=lr, preconditioner_update_probability=schedule)
        state = opt.init(params)

        def step(carry, t):
            params, state = carry
            loss, g = pb.loss_grad(params, jax.random.fold_in(k_data, t), data, t)
            u, state = opt.update(g, state, params)
            return (optax.apply_updates(params, u), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), jnp.arange(pb.steps))
        return losses, pb.evaluate(params, data, pb.steps - 1), state[0].refits

    f = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))
    lr = jnp.asarray([g[0] for g in grid], jnp.float32)
    sd = jnp.asarray([g[1] for g in grid], jnp.int32)
    t0 = time.perf_counter()
    losses, evals, refits = jax.device_get(f(lr, sd, pb.data))
    return np.asarray(losses), np.asarray(evals), np.asarray(refits), grid, \
        time.perf_counter() - t0


def primary(pb: Problem, losses, evals) -> np.ndarray:
    if not pb.window:
        return evals[:, 0]
    seg = pb.segment or pb.steps
    ends = range(seg, pb.steps + 1, seg)
    return np.mean([losses[:, e - pb.window:e].mean(axis=1) for e in ends], axis=0)


def run(pb: Problem, tolerances: list[float]) -> list[dict]:
    """Every schedule, then for each adaptive one a fixed probability with the same
    number of refits (the comparison at equal refit cost)."""
    rows = []
    schedules = {k: v for k, v in SCHEDULES.items() if k != "adaptive"}
    for tol in tolerances:
        schedules[f"adaptive tol {tol:g}"] = psgd_eqx.adaptive_refit_schedule(tolerance=tol)
    pending = list(schedules.items())
    while pending:
        name, schedule = pending.pop(0)
        losses, evals, refits, grid, secs = train(pb, schedule, pb.lrs, pb.seeds)
        metric = primary(pb, losses, evals)
        lrs = np.asarray([g[0] for g in grid])
        by_lr = {lr: metric[lrs == lr].mean() for lr in pb.lrs}
        sign = -1 if pb.higher_better else 1
        best = min(by_lr, key=lambda lr: sign * np.nan_to_num(by_lr[lr], nan=np.inf * sign))
        sel = lrs == best
        row = dict(schedule=name, lr=best, metric=float(metric[sel].mean()),
                   spread=float(np.ptp(metric[sel]) / 2), refits=float(refits[sel].mean()),
                   secs=secs)
        for j, e in enumerate(pb.eval_names):
            row[e] = float(evals[sel, j].mean())
        rows.append(row)
        if name.startswith("adaptive"):  # the fixed rate that spends as many refits
            rate = round(min(1.0, row["refits"] / pb.steps), 3)
            pending.insert(0, (f"p={rate:g} (= refits of {name})", rate))
        print(f"  {pb.name:>9} {name:>16}: lr {best:g}  {pb.primary} {row['metric']:.4g} "
              f"± {row['spread']:.2g}  refits {row['refits']:.0f}/{pb.steps}  ({secs:.0f} s)",
              flush=True)
    return rows


def xor_run(steps: int, lr: float = 1e-3, seeds=(0, 1)) -> list[str]:
    """examples/delayed_xor.py (length-32 delayed XOR, the reference's KronWhiten settings)
    at its best lr with four refit schedules: every step (the reference's), the anneal,
    adaptive, and the fixed rate with the adaptive run's refits. Returns Markdown table
    rows: final loss, solved seeds, refits."""
    import delayed_xor as dx

    rows = []
    names = ["kron", "kron_anneal", "kron_adaptive", "kron_fixed"]
    refits = np.zeros(1)  # the previous run's (the adaptive one's before "kron_fixed")
    for name in names:
        if name == "kron_fixed":  # the fixed rate that spends the adaptive run's refits
            dx.REFITS[name] = round(float(np.mean(refits)) / steps, 3)
        t0 = time.perf_counter()
        lrs = jnp.asarray([lr] * len(seeds), jnp.float32)
        sds = jnp.asarray(seeds, jnp.int32)
        params, states = dx.initialiser(name)(lrs, sds)
        chunks, start = [], 0
        while start < steps:
            length = min(dx.CHUNK, steps - start)
            params, states, losses = dx.chunk_runner(name, length)(
                lrs, sds, params, states, jnp.int32(start))
            chunks.append(np.asarray(losses))
            start += length
        losses = np.concatenate(chunks, axis=1)
        refits = np.asarray(states[0].refits)
        finals = [float(np.mean(r[-dx.FINAL_WINDOW:])) for r in losses]
        hits = [dx.first_below(r) for r in losses]
        row = (f"| {dx.REFITS[name]!r} | {np.mean(finals):.4f} "
               f"({', '.join(f'{f:.4f}' for f in finals)}) | "
               f"{', '.join('never' if h is None else str(h) for h in hits)} | "
               f"{', '.join(str(int(r)) for r in refits)} |")
        print(f"  xor {name}: {row}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append(row)
    return rows


def report(results: dict[str, tuple[Problem, list[dict]]]) -> str:
    lines = [f"### Adaptive refits vs the anneal ({datetime.date.today()}, "
             f"{platform.processor() or platform.machine()}, psgd_eqx {lib_commit()})", "",
             "`python benchmarks/adaptive_refits.py` — best lr per schedule, mean ± half-range "
             "over seeds.", ""]
    for pb, rows in results.values():
        lines += [f"**{pb.title}** ({pb.steps} steps, lrs {list(pb.lrs)}, {pb.seeds} seeds)",
                  "", f"| schedule | best lr | {pb.primary} | refits |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['schedule']} | {r['lr']:g} | {r['metric']:.4g} ± "
                         f"{r['spread']:.2g} | {r['refits']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="rotating,quadratic,digits")
    ap.add_argument("--omega", type=float, default=2e-3)
    ap.add_argument("--tolerances", default="0.5,1,2",
                    help="tolerances of the adaptive schedules compared (0.5 = default)")
    args = ap.parse_args(argv)
    makers = {"rotating": lambda: rotating_problem(args.quick, args.omega),
              "quadratic": lambda: _wrap(quadratic_problem(args.quick)),
              "digits": lambda: _wrap(digits_problem(args.quick))}
    results = {}
    if "xor" in args.only.split(","):
        rows = xor_run(1000 if args.quick else 6000)
        print("\n**delayed XOR (examples/delayed_xor.py, length 32, lr 1e-3, seeds 0, 1)**\n")
        print("| schedule | final loss (per seed) | step with loss < 0.1 | refits |")
        print("|---|---|---|---|")
        print("\n".join(rows))
    for name in [n for n in args.only.split(",") if n != "xor"]:
        pb = makers[name]()
        print(f"== {pb.title}", flush=True)
        results[name] = (pb, run(pb, [float(t) for t in args.tolerances.split(",")]))
    print()
    print(report(results))


if __name__ == "__main__":
    main()
