"""Multi-process training: the FSDP transformer of `sharded_transformer.py` on 2 processes.

Run with

    python examples/multiprocess_train.py --spawn 2 [--steps N] [--local-devices 4] [--compare]

`--spawn 2` starts two copies of this script on this machine (processes 0 and 1, 4 simulated
CPU devices each, a coordinator on a free local port) and waits for them. Each copy calls
`jax.distributed.initialize`, after which `jax.devices()` lists all 8 devices of both
processes; the mesh, the parameters, the batch and the optimizer state are global arrays
over those 8 devices, and the two processes run one program, exchanging data through
XLA's CPU collectives (gloo). The training code is `sharded_transformer.main`, unchanged:
its arrays are built with `jax.make_array_from_callback`, which asks each process only for
the slices its own devices hold.

`--compare` then runs `sharded_transformer.py` in one process on as many devices (8) with
the same global batch and seeds, and prints the largest difference between the two loss
curves (they are the same program, so they agree to float32 rounding).

On several machines, start one process per machine yourself, with the same coordinator
(process 0's host and a free port) and each machine's own `--process-id`:

    python examples/multiprocess_train.py --coordinator HOST0:PORT --num-processes 2 --process-id 0
    python examples/multiprocess_train.py --coordinator HOST0:PORT --num-processes 2 --process-id 1

(On accelerators drop the simulated CPU devices, `--local-devices 0`; under SLURM or on
Cloud TPU `jax.distributed.initialize()` finds these values by itself.)
"""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time


HERE = pathlib.Path(__file__).resolve().parent
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(device_count: int) -> str:
    """The current `XLA_FLAGS` with the simulated CPU device count set to `device_count`
    (no count if 0); other flags are kept."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(DEVICE_COUNT_FLAG)]
    if device_count:
        flags.append(f"{DEVICE_COUNT_FLAG}={device_count}")
    return " ".join(flags)


def free_port() -> int:
    """A TCP port that is free on this machine now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_args(args) -> list[str]:
    """The flags that `sharded_transformer.py` and this script share, as a command line."""
    return ["--steps", str(args.steps), "--d-model", str(args.d_model),
            "--layers", str(args.layers), "--heads", str(args.heads),
            "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--lr", str(args.lr),
            *(["--owner"] if args.owner else [])]


# ------------------------------------------------------------------------ one process


def run_process(args) -> dict:
    """One process of the run: join the others and train.

    **Arguments:**

    - `args`: the parsed command line (`--coordinator`, `--num-processes`, `--process-id`,
      `--local-devices` and the model flags).

    **Returns:** `sharded_transformer.main`'s result (the same on every process), with
    `process_index` and `process_count` added.
    """
    if args.local_devices:
        # Read by XLA when its CPU backend starts, so it is set before JAX is imported.
        os.environ["XLA_FLAGS"] = xla_flags(args.local_devices)

    import jax

    # The CPU backend's cross-process collectives (the default in recent jax; set so the
    # choice is visible). Must precede the first use of a backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    try:
        # Starts the backends now, with this process' XLA_FLAGS: importing
        # sharded_transformer adds its own default device count to XLA_FLAGS when none is set.
        local, total = jax.local_device_count(), jax.device_count()
        sys.path.insert(0, str(HERE))
        import sharded_transformer

        if jax.process_index() == 0:
            print(f"process 0 of {jax.process_count()}: {local} local devices, {total} in all")
        result = sharded_transformer.main(
            steps=args.steps, d_model=args.d_model, n_layers=args.layers,
            n_heads=args.heads, seq_len=args.seq_len, batch_size=args.batch,
            learning_rate=args.lr, owner=args.owner,
        )
        result["process_index"] = jax.process_index()
        result["process_count"] = jax.process_count()
        result["n_devices"] = jax.device_count()
        return result
    finally:
        jax.distributed.shutdown()


# ---------------------------------------------------------------------------- launcher


def spawn(args) -> dict:
    """Start `args.spawn` processes of this script on this machine and wait for them.

    **Arguments:**

    - `args`: the parsed command line (`--spawn`, `--local-devices`, `--compare`,
      `--timeout` and the model flags).

    **Returns:** process 0's result (after checking that every process saw the same losses)
    with `wall_s` added, and `single_process_losses` when `args.compare`.
    """
    n = args.spawn
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS=xla_flags(args.local_devices))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        procs, logs = [], []
        t0 = time.perf_counter()
        for i in range(n):
            cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
                   "--coordinator", coordinator, "--num-processes", str(n),
                   "--process-id", str(i), "--local-devices", str(args.local_devices),
                   "--json", str(tmp / f"process_{i}.json"), *model_args(args)]
            # Process 0 prints to this terminal; the others' output is kept for errors.
            log = None if i == 0 else open(tmp / f"process_{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT if log else None))
        try:
            deadline = time.monotonic() + args.timeout
            for i, proc in enumerate(procs):
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0:
                    raise RuntimeError(f"process {i} exited with {code}" + _tail(tmp, i))
        finally:
            # A process whose peer died waits for it at the next collective: end them all.
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for log in logs:
                if log is not None:
                    log.close()
        wall_s = time.perf_counter() - t0
        results = [json.loads((tmp / f"process_{i}.json").read_text()) for i in range(n)]
    if any(r["losses"] != results[0]["losses"] for r in results):
        raise RuntimeError("the processes saw different losses")
    result = dict(results[0], wall_s=wall_s)
    print(f"{n} processes x {args.local_devices} devices: {wall_s:.1f} s in all")

    if args.compare:
        result["single_process_losses"] = compare(args, result["losses"], n)
    return result


def compare(args, losses: list[float], n_processes: int) -> list[float]:
    """Run `sharded_transformer.py` in one process on all the devices of the multi-process
    run and print the largest difference between the loss curves.

    **Arguments:**

    - `args`: the parsed command line (`--local-devices`, `--timeout`, the model flags).
    - `losses`: the multi-process run's losses.
    - `n_processes`: how many processes it had.

    **Returns:** the single-process run's losses.
    """
    devices = n_processes * args.local_devices
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "single.json"
        cmd = [sys.executable, str(HERE / "sharded_transformer.py"), "--devices", str(devices),
               "--json", str(out), *model_args(args)]
        subprocess.run(cmd, env=dict(os.environ, XLA_FLAGS=xla_flags(devices)),
                       stdout=subprocess.DEVNULL, check=True, timeout=args.timeout)
        single = json.loads(out.read_text())["losses"]
    diff = max(abs(a - b) for a, b in zip(losses, single))
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, single))
    print(f"1 process x {devices} devices: the same {len(single)} losses to within "
          f"{diff:.2e} ({rel:.2e} relative)")
    return single


def _tail(tmp: pathlib.Path, i: int) -> str:
    log = tmp / f"process_{i}.log"
    return ":\n" + log.read_text()[-3000:] if log.exists() else ""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    launch = parser.add_argument_group("launching")
    launch.add_argument("--spawn", type=int, default=0, metavar="N",
                        help="start N processes on this machine and wait for them")
    launch.add_argument("--compare", action="store_true",
                        help="with --spawn: also run on one process, compare the losses")
    launch.add_argument("--timeout", type=float, default=1800,
                        help="with --spawn: seconds before the processes are ended (1800)")
    one = parser.add_argument_group("one process of a run (what --spawn passes)")
    one.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    one.add_argument("--num-processes", type=int, default=None)
    one.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--local-devices", type=int, default=4,
                        help="simulated CPU devices per process (4); 0: the real ones")
    parser.add_argument("--steps", type=int, default=200, help="training steps (200)")
    parser.add_argument("--d-model", type=int, default=64, help="model width (64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--seq-len", type=int, default=64, help="context length (64)")
    parser.add_argument("--batch", type=int, default=32, help="global sequences per step (32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    parser.add_argument("--json", default=None, help="write the result dict to this file")
    parser.add_argument("--owner", action="store_true",
                        help="owner-computes sharding (owner_axes='fsdp') instead of placement")
    args = parser.parse_args()
    if args.compare and not args.spawn:
        parser.error("--compare needs --spawn")
    result = spawn(args) if args.spawn else run_process(args)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
