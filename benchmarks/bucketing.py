"""Same-shape bucketing: XLA op count and step time of a 24-layer transformer-shaped tree.

The tree is *not* scanned (one dict per layer, as a plain `for` loop over layers builds it),
so each layer's q/k/v/o, MLP and norm leaves repeat 24 times. `kron(bucket_leaves=True)`
refits and applies each group of identical preconditioners in one `vmap`ped call,
`"auto"` (the default) buckets the refits everywhere and the applies off CPU, and
`bucket_leaves=False` makes one call per leaf. The refit probability is 1.0, so every
step refits every factor.

Ops are counted two ways: StableHLO ops in the lowered module (what the optimizer emits)
and instructions outside fusions in the optimized HLO (what XLA runs, one kernel/thunk
each on CPU).

    python benchmarks/bucketing.py [--layers 24] [--d-model 64] [--reps 20]
"""

import argparse
import re
import time

import jax
import jax.numpy as jnp
import optax

import psgd_eqx


def transformer_tree(layers: int, d: int, vocab: int = 256):
    key = jax.random.PRNGKey(0)
    params = {"embed": jax.random.normal(key, (vocab, d)) * 0.02, "blocks": []}
    for i in range(layers):
        ks = jax.random.split(jax.random.fold_in(key, i), 6)
        params["blocks"].append({
            "wq": jax.random.normal(ks[0], (d, d)) * 0.02,
            "wk": jax.random.normal(ks[1], (d, d)) * 0.02,
            "wv": jax.random.normal(ks[2], (d, d)) * 0.02,
            "wo": jax.random.normal(ks[3], (d, d)) * 0.02,
            "up": jax.random.normal(ks[4], (d, 4 * d)) * 0.02,
            "down": jax.random.normal(ks[5], (4 * d, d)) * 0.02,
            "ln1": jnp.ones((d,)),
            "ln2": jnp.ones((d,)),
        })
    params["unembed"] = jax.random.normal(key, (d, vocab)) * 0.02
    return params


def stablehlo_ops(text: str) -> int:
    return len(re.findall(r"=\s*(?:\"?stablehlo\.|\"?chlo\.|call )|stablehlo\.return", text))


def hlo_top_level_instructions(text: str) -> int:
    """Instructions of the optimized HLO outside fused computations."""
    count, in_fused = 0, False
    for line in text.splitlines():
        head = line.strip()
        if head.endswith("{") and ("fused" in head.split(" ")[0] or "fusion" in head.split(" ")[0]
                                   or head.startswith("%fused")):
            in_fused = True
            continue
        if head.endswith("{"):
            in_fused = False
            continue
        if head == "}":
            in_fused = False
            continue
        if not in_fused and " = " in head and not head.startswith("//"):
            count += 1
    return count


def measure(bucket: bool, params, grads, reps: int):
    opt = psgd_eqx.kron(1e-3, bucket_leaves=bucket, preconditioner_update_probability=1.0)
    state = opt.init(params)

    def step(g, s, p):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    lowered = jax.jit(step).lower(grads, state, params)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    out = compiled(grads, state, params)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = compiled(grads, out[1], out[0])
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "stablehlo_ops": stablehlo_ops(lowered.as_text()),
        "hlo_instructions": hlo_top_level_instructions(compiled.as_text()),
        "compile_s": compile_s,
        "step_ms": 1e3 * times[len(times) // 2],
    }


def main(layers: int = 24, d_model: int = 64, reps: int = 20):
    params = transformer_tree(layers, d_model)
    grads = jax.tree.map(lambda p: 0.01 * jnp.sin(p * 7.0 + 1.0), params)
    per_leaf = measure(False, params, grads, reps)
    auto = measure("auto", params, grads, reps)
    bucketed = measure(True, params, grads, reps)
    rows = [
        ("StableHLO ops (lowered)", "stablehlo_ops", "{:,}"),
        ("HLO instructions outside fusions (optimized)", "hlo_instructions", "{:,}"),
        ("compile time (s)", "compile_s", "{:.1f}"),
        ("step time, median (ms)", "step_ms", "{:.1f}"),
    ]
    print(f"{layers} layers, d_model {d_model}, {len(jax.tree.leaves(params))} leaves, "
          f"refit probability 1.0, device {jax.devices()[0].device_kind}")
    print("| | per leaf (`False`) | refits bucketed (`\"auto\"` on CPU) | all bucketed (`True`) "
          "| per leaf / auto | per leaf / all |")
    print("|---|---|---|---|---|---|")
    for name, k, fmt in rows:
        a, b, c = per_leaf[k], auto[k], bucketed[k]
        print(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {fmt.format(c)} | "
              f"{a / b:.2f}× | {a / c:.2f}× |")
    return {"per_leaf": per_leaf, "auto": auto, "bucketed": bucketed}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    main(a.layers, a.d_model, a.reps)
