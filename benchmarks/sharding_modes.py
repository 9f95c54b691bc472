"""Sharding modes: placement vs owner-computes on a transformer-shaped tree (simulated devices).

`psgd_eqx.kron(owner_axes=None)` (placement) keeps every state array on its parameter's
`PartitionSpec` and lets XLA's SPMD partitioner decide the communication;
`owner_axes="fsdp"` (owner-computes) stores each bucket of same-shape leaves as one stack,
padded with inert members to a multiple of the owner axes' size and sharded along the
stack, so each device refits and applies only the members it owns, with one all-to-all in
and one out per bucket.

The tree is `L` layers of {qkv (256, 768), o (256, 256), up (256, 1024), down (1024, 256)}
(four buckets of `L` members), on an FSDP mesh of `--devices` simulated CPU devices (each
weight's largest axis divisible by the device count is sharded). kron's defaults, refit
probability 1.0. Per `L` and mode, from one compiled `update` (gradients given):

- FLOPs per device (`compiled.cost_analysis()`) / (the 1-device update's FLOPs / n);
- collectives in the optimized HLO (`compiled.as_text()`), by kind, the bytes of their
  results on one device (from the HLO's per-device shapes), and the number of buckets
  with the count owner-computes should stay within (2 per bucket + 4);
- preconditioner bytes on the fullest device vs (1-device total / n), and the bytes of the
  inert padding members;
- median wall ms of one jitted `update` (state donated), the modes and the 1-device
  update interleaved. Simulated devices share the machine's cores, so this time is
  indicative only: on real devices the n shards run in parallel.

    python benchmarks/sharding_modes.py [--layers 4,8,16] [--devices 8] [--quick]
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=str, default="4,8,16",
                    help="comma-separated layer counts L (default 4,8,16)")
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7, help="interleaved timing repetitions (≥ 5)")
    ap.add_argument("--steps", type=int, default=5, help="updates per repetition (≥ 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: L = 4 only, 5 reps of 5 steps")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.reps, a.steps = "4", 5, 5
    a.reps, a.steps = max(a.reps, 5), max(a.steps, 5)
    return a


ARGS = _args() if __name__ == "__main__" else None
# The simulated devices must be requested before jax is imported.
_N = ARGS.devices if ARGS is not None else 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_N}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import psgd_eqx  # noqa: E402
from psgd_eqx._packing import member_cost, pack  # noqa: E402


KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def kron_kwargs():
    return dict(learning_rate=1e-3, preconditioner_update_probability=1.0)


def tf_params(layers: int, d: int = 256):
    key = jax.random.PRNGKey(0)
    out = []
    for i in range(layers):
        ks = jax.random.split(jax.random.fold_in(key, i), 4)
        out.append({
            "qkv": 0.02 * jax.random.normal(ks[0], (d, 3 * d)),
            "o": 0.02 * jax.random.normal(ks[1], (d, d)),
            "up": 0.02 * jax.random.normal(ks[2], (d, 4 * d)),
            "down": 0.02 * jax.random.normal(ks[3], (4 * d, d)),
        })
    return {"layers": out}


def fsdp_specs(params, n: int):
    """Shard each weight's largest axis that `n` divides over "fsdp" (replicated if none)."""
    def spec(x):
        axes = [i for i in range(x.ndim) if x.shape[i] % n == 0]
        if not axes:
            return P()
        best = max(axes, key=lambda i: x.shape[i])
        return P(*[("fsdp" if i == best else None) for i in range(x.ndim)])

    return jax.tree.map(spec, params)


def to_shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def collectives(hlo: str) -> dict:
    return {k: len(re.findall(rf"\b{k}(?:-start)?\(", hlo)) for k in KINDS}


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}


def collective_bytes(hlo: str) -> int:
    """Bytes of the collectives' results on one device (the SPMD HLO's shapes are
    per device): how much each device receives, roughly."""
    total = 0
    pattern = rf"=\s*(.*?)\s+(?:{'|'.join(KINDS)})(?:-start)?\("
    for line in hlo.splitlines():
        m = re.search(pattern, line)
        if not m:
            continue
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            total += size * _BYTES.get(dtype, 8 if dtype.endswith("64") else 4)
    return total


class Config:
    """One compiled, donated `update` on a mesh of the first `n` devices."""

    def __init__(self, params, n: int, owner: bool):
        self.n, self.owner = n, owner
        self.mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,),
                                  devices=jax.devices()[:n])
        pspecs = fsdp_specs(params, n)
        kw = dict(kron_kwargs(), params_partition_specs=pspecs)
        if owner:
            kw["owner_axes"] = "fsdp"
        opt = psgd_eqx.kron(**kw)
        p_sh = to_shardings(self.mesh, pspecs)
        s_sh = to_shardings(self.mesh, psgd_eqx.get_opt_state_partition_specs(
            params, mesh=self.mesh, **kw))
        self.params = jax.device_put(params, p_sh)
        self.grads = jax.device_put(
            jax.tree.map(lambda p: 0.01 * jnp.cos(3.0 * p), params), p_sh)
        with jax.set_mesh(self.mesh):
            self.state = jax.jit(opt.init, out_shardings=s_sh)(self.params)
            fn = jax.jit(opt.update, in_shardings=(p_sh, s_sh, p_sh),
                         out_shardings=(p_sh, s_sh), donate_argnums=(1,))
            t0 = time.perf_counter()
            self.compiled = fn.lower(self.grads, self.state, self.params).compile()
            self.compile_s = time.perf_counter() - t0
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost["flops"])
        self.coll = collectives(self.compiled.as_text())
        self.coll_bytes = collective_bytes(self.compiled.as_text())
        layout = self.state[0].precond
        per_device: dict = {}
        for leaf in jax.tree.leaves(layout):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        self.bytes_per_device = max(per_device.values())
        self.buckets = sum(len(idx) > 1 for idx in layout.index)
        pads = layout.pad or (0,) * len(layout.index)
        self.pad_bytes = 0
        for idx, stack, pad in zip(layout.index, layout.stacks, pads):
            if pad:
                stack_bytes = sum(x.nbytes for x in jax.tree.leaves(stack))
                self.pad_bytes += stack_bytes * pad // (len(idx) + pad)
        self.times: list[float] = []
        self.run(1)  # warm-up

    def run(self, steps: int) -> float:
        """Run `steps` updates; return the mean ms per update."""
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            for _ in range(steps):
                updates, self.state = self.compiled(self.grads, self.state, self.params)
            jax.block_until_ready((updates, self.state))
            return 1e3 * (time.perf_counter() - t0) / steps


def _update_flops(params) -> float:
    """FLOPs of one 1-device `update` of `params` (`compiled.cost_analysis()`)."""
    opt = psgd_eqx.kron(**kron_kwargs())
    state = opt.init(params)
    cost = jax.jit(opt.update).lower(params, state, params).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def packing_bounds(params, n: int) -> dict:
    """How evenly whole matrices can be spread over `n` owners, from each shape's
    one-matrix update FLOPs, as max per-device FLOPs ÷ (total / n): padding each bucket
    to a multiple of `n` with the padding at the end (a device does ⌈members/n⌉ members
    of *every* bucket: owner-computes before the packing); the library's packing
    (`psgd_eqx._packing.pack`, which balances its own cost estimate, scored here with the
    measured FLOPs); and whole matrices of any bucket on the least-loaded device (LPT
    without the per-bucket row limit: a bound)."""
    leaves = jax.tree.leaves(params)
    shapes: dict = {}
    for x in leaves:
        shapes[x.shape] = shapes.get(x.shape, 0) + 1
    per = {s: _update_flops(jnp.zeros(s)) for s in shapes}
    ideal = sum(per[s] * c for s, c in shapes.items()) / n
    padded = sum(per[s] * -(-c // n) for s, c in shapes.items())
    loads = [0.0] * n
    for w in sorted((per[s] for s, c in shapes.items() for _ in range(c)), reverse=True):
        loads[loads.index(min(loads))] += w
    # the library's own packing, from the preconditioners `init` builds for one member
    opt = psgd_eqx.kron(**kron_kwargs())
    order = list(shapes)
    costs = [member_cost(jax.tree.leaves(opt.init(jnp.zeros(s))[0].precond.stacks)) for s in order]
    _, slots = pack([shapes[s] for s in order], costs, n)
    lib = [0.0] * n
    for s, rows in zip(order, slots):
        if not rows:  # a bucket of one is not stacked: placed, split over every device
            lib = [w + per[s] / n for w in lib]
        for r in rows:
            lib[r // -(-shapes[s] // n)] += per[s]
    return dict(per_matrix_mflops={str(s): round(w / 1e6, 1) for s, w in per.items()},
                padded=padded / ideal, library=max(lib) / ideal, packed=max(loads) / ideal)


def environment() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return [
        f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, psgd_eqx commit "
        f"`{commit or 'unknown'}`",
        f"- date {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores; "
        f"{len(jax.devices())} simulated {jax.devices()[0].platform.upper()} devices",
    ]


def main(a) -> int:
    n = a.devices
    if len(jax.devices()) < n:
        print(f"only {len(jax.devices())} devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')})",
              file=sys.stderr)
        return 1
    layers = [int(x) for x in a.layers.split(",") if x.strip()]
    print(f"# Sharding modes: placement vs owner-computes, {n} simulated devices")
    print("\n".join(environment()))
    print(f"- `python benchmarks/sharding_modes.py --layers {a.layers} --devices {n} "
          f"--reps {a.reps} --steps {a.steps}`; kron defaults, refit p = 1, "
          f"d_model {a.d_model}")
    t_start = time.perf_counter()
    rows = []
    for L in layers:
        params = tf_params(L, a.d_model)
        configs = {"1 device": Config(params, 1, owner=False),
                   "placement": Config(params, n, owner=False),
                   "owner": Config(params, n, owner=True)}
        print(f"L={L}: compiled (s) " + ", ".join(
            f"{k} {c.compile_s:.1f}" for k, c in configs.items()), file=sys.stderr, flush=True)
        names = list(configs)
        for r in range(a.reps):  # interleaved, rotated order
            for k in names[r % len(names):] + names[:r % len(names)]:
                configs[k].times.append(configs[k].run(a.steps))
        single = configs["1 device"]
        for mode in ("placement", "owner"):
            c = configs[mode]
            rows.append(dict(
                L=L, mode=mode, leaves=len(jax.tree.leaves(params)),
                flops_ratio=c.flops / (single.flops / n), coll=c.coll,
                total=sum(c.coll.values()), coll_mb=c.coll_bytes / 1e6,
                buckets=c.buckets, allowed=2 * c.buckets + 4,
                bytes=c.bytes_per_device, total_over_n=single.bytes_per_device / n,
                pad=c.pad_bytes, ms=statistics.median(c.times),
                single_ms=statistics.median(single.times)))
        print(f"L={L}: done at {time.perf_counter() - t_start:.0f} s", file=sys.stderr,
              flush=True)
        del configs

    print()
    print("| L | mode | FLOPs/device ÷ (1-device / n) | all-gather | all-reduce | all-to-all "
          "| other | total | collective MB/device | buckets (allowed: 2/bucket + 4) "
          "| precond bytes/device | ÷ (total / n) | padding bytes (all devices) "
          "| update ms (median) "
          "| 1-device update ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["coll"]
        other = c["collective-permute"] + c["reduce-scatter"]
        print(f"| {r['L']} | {r['mode']} | {r['flops_ratio']:.2f} | {c['all-gather']} | "
              f"{c['all-reduce']} | {c['all-to-all']} | {other} | {r['total']} | "
              f"{r['coll_mb']:.1f} | {r['buckets']} ({r['allowed']}) | {r['bytes']:,} | "
              f"{r['bytes'] / r['total_over_n']:.2f} | {r['pad']:,} | {r['ms']:.1f} | "
              f"{r['single_ms']:.1f} |")
    print()
    print(f"Times: median over {a.reps} interleaved repetitions of {a.steps} updates "
          f"(state donated). The {n} simulated CPU devices share this machine's "
          f"{os.cpu_count()} cores, so the time is indicative only (on real devices the "
          "shards run in parallel).")
    print()
    print("Packing (whole matrices, 1-device FLOPs of one matrix's update): max "
          "per-device FLOPs ÷ (total / n) with each bucket padded at its end (owner-computes "
          "before the packing), with the library's packing across buckets (what "
          "owner-computes does; the FLOPs row above measures it), and the bound of any "
          "whole-matrix assignment found greedily:")
    print()
    print("| L | per-matrix update MFLOPs | padded at the end | library packing | bound |")
    print("|---|---|---|---|---|")
    for L in layers:
        b = packing_bounds(tf_params(L, a.d_model), n)
        print(f"| {L} | {b['per_matrix_mflops']} | {b['padded']:.2f} | {b['library']:.2f} "
              f"| {b['packed']:.2f} |")
    print()
    print(f"Total wall time {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
