"""Block sizes, their per-backend validation, defaults, padding and the dispatch table.

Shared by every op of the package. The ops tile their matrices into `block_m × block_k`
(left operand), `block_k × block_n` (right operand) and `block_m × block_n` (output) tiles;
which dims are the *minor* (last) ones of a tile depends on whether the op reads an operand
transposed, so each op passes its own list of tile shapes to
[`BlockSizes.validate`][psgd_eqx_kernels.BlockSizes.validate].
"""

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp


Backend = Literal["gpu", "tpu"]
BACKENDS: tuple[str, ...] = ("gpu", "tpu")

# Triton's tl.dot needs every dim of a tile to be at least 16.
_GPU_MIN_BLOCK = 16
# Mosaic TPU: (sublane, lane) tiling of the last two dims of a block.
_TPU_SUBLANE = 8
_TPU_LANE = 128

_FIELDS = ("block_m", "block_n", "block_k")


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of a kernel launch (a static, hashable configuration).

    Products are tiled as `(block_m, block_k) @ (block_k, block_n) -> (block_m, block_n)`;
    a dim smaller than its block is handled by shrinking the block to the smallest size
    the backend allows that covers it, and a dim that is not a multiple of its block is
    zero-padded inside the wrapper (and the result sliced back).

    **Arguments:**

    - `block_m`: rows of an output tile.
    - `block_n`: columns of an output tile.
    - `block_k`: depth of one step of the contraction.
    - `num_warps`: GPU (Triton) only: warps per program; `None` = 4 for tiles of at most
        64×64, else 8.
    - `num_stages`: GPU (Triton) only: software-pipelining depth of the contraction loop;
        `None` = 3.

    Backend constraints, checked by [`BlockSizes.validate`][psgd_eqx_kernels.BlockSizes.validate]
    (interpret mode does not enforce them, hardware does):

    - `"gpu"` (Pallas Triton): every block a power of two and at least 16 (`tl.dot`).
    - `"tpu"` (Mosaic TPU): the last two dims of every tile a multiple of `(8, 128)`; which
        fields are the last dim depends on the op (a transposed operand swaps them).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int | None = None
    num_stages: int | None = None

    def validate(
        self,
        backend: str,
        tiles: tuple[tuple[str, str], ...] = (
            ("block_m", "block_k"),
            ("block_k", "block_n"),
            ("block_m", "block_n"),
        ),
    ) -> None:
        """Raise `ValueError` naming the field and its value if a block breaks a constraint
        of `backend`.

        **Arguments:**

        - `backend`: `"gpu"` or `"tpu"`.
        - `tiles`: the `(second-minor, minor)` field names of every tile the op loads or
            stores (the default is a plain, untransposed product).

        **Returns:** `None`.
        """
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int or None; got {value!r}.")
        if self.num_warps is not None and not _is_pow2(self.num_warps):
            raise ValueError(f"`num_warps` must be a power of two; got {self.num_warps}.")
        if backend == "gpu":
            for name in _FIELDS:
                value = getattr(self, name)
                if not _is_pow2(value):
                    raise ValueError(
                        f"`{name}`={value} must be a power of two on the GPU (Triton) backend "
                        f"(e.g. {_next_pow2(value)})."
                    )
                if value < _GPU_MIN_BLOCK:
                    raise ValueError(
                        f"`{name}`={value} must be at least {_GPU_MIN_BLOCK} on the GPU "
                        "(Triton) backend (`tl.dot` tiles)."
                    )
        else:
            for second, minor in tiles:
                sv, mv = getattr(self, second), getattr(self, minor)
                if sv % _TPU_SUBLANE:
                    raise ValueError(
                        f"`{second}`={sv} must be a multiple of {_TPU_SUBLANE} on the TPU "
                        f"backend: it is the second-to-last dim of a ({second}, {minor}) tile."
                    )
                if mv % _TPU_LANE:
                    raise ValueError(
                        f"`{minor}`={mv} must be a multiple of {_TPU_LANE} on the TPU "
                        f"backend: it is the last dim of a ({second}, {minor}) tile."
                    )

    def fitted(self, backend: str, name: str, dim: int) -> int:
        """Block `name`, shrunk to the smallest legal size that covers `dim` if it is larger."""
        block = getattr(self, name)
        if backend == "gpu":
            cover = _next_pow2(max(dim, _GPU_MIN_BLOCK))
        else:
            cover = _round_up(max(dim, 1), _TPU_LANE)
        return min(block, cover)

    def warps(self, bm: int, bn: int) -> int:
        if self.num_warps is not None:
            return self.num_warps
        return 4 if bm * bn <= 64 * 64 else 8

    def stages(self) -> int:
        return 3 if self.num_stages is None else self.num_stages


BlockSizes.__init__.__doc__ = """**Arguments:** see the class docstring."""


def default_block_sizes(backend: str, dtype: Any, n: int, batch: int) -> BlockSizes:
    """Heuristic default tiles for products of `n`-sized square matrices over a stack.

    GPU (measured on an H100, f32/TF32, n = 1024 and 4096): 128×64 output tiles with 4 warps
    and 4 pipeline stages were the fastest of the shapes tried for every op; stacks too
    small to fill the 132 SMs with them use 64×64 (or 32×32 for tiny n). `block_k` = 32
    for 4-byte, 64 for 2-byte operands. TPU (not measured): 256 where the dim allows, else 128.

    **Arguments:**

    - `backend`: `"gpu"` or `"tpu"`.
    - `dtype`: the operand dtype.
    - `n`: the matrix size.
    - `batch`: the number of matrices in the stack.

    **Returns:** a [`BlockSizes`][psgd_eqx_kernels.BlockSizes].
    """
    if backend == "tpu":
        b = 256 if n >= 256 else 128
        return BlockSizes(block_m=b, block_n=b, block_k=b)
    bk = 64 if jnp.dtype(dtype).itemsize <= 2 else 32
    if n <= 32:
        return BlockSizes(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2)
    if batch * pl_cdiv(n, 128) * pl_cdiv(n, 64) >= 132 or n >= 512:
        return BlockSizes(block_m=128, block_n=64, block_k=bk, num_warps=4, num_stages=4)
    return BlockSizes(block_m=64, block_n=64, block_k=bk, num_warps=4, num_stages=3)


def aligned_dim(backend: str, dim: int, lane: bool, sublane: int = _TPU_SUBLANE) -> int:
    """`dim` zero-padded for a whole-array block (the fused kernels): on GPU (Triton) a
    power of two ≥ 16 (`tl.dot`); on TPU (Mosaic) a multiple of 128 for a lane (last) dim
    and of `sublane` (8 for f32, 16 to also pack bf16) for the second-to-last."""
    if backend == "gpu":
        return _next_pow2(max(dim, _GPU_MIN_BLOCK))
    return _round_up(max(dim, 1), _TPU_LANE if lane else sublane)


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded_dim(blocks: BlockSizes, backend: str, dim: int, names: tuple[str, ...]) -> int:
    """`dim` rounded up to a multiple of every (fitted) block in `names` that tiles it."""
    mult = 1
    for name in names:
        mult = math.lcm(mult, blocks.fitted(backend, name, dim))
    return _round_up(dim, mult)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")


def check_dtype(name: str, dtype: Any) -> None:
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"`{name}` must be float32 or bfloat16 for the kernels; got {dtype}.")


# -- dispatch table ----------------------------------------------------------------------
# Measured on one H100 80GB HBM3 (jax 0.11.2, Pallas Triton, f32 with TF32 products as in
# XLA's default), benchmarks/kernels.py, 2026-11-24: the smallest n, per stack size, from
# which the kernel beat the XLA reference by ≥ 10% at every larger measured n; `None` = not
# faster at any measured size, keep the reference. Details in benchmarks/RESULTS.md,
# "Pallas kernels (issue 6)".
KERNEL_MIN_N: dict[str, dict[int, int | None]] = {
    "eq_factor_update": {1: 2048, 8: 1024, 32: 512},
    "pro_factor_update": {1: None, 8: None, 32: None},
    "kron_apply": {1: None, 8: None, 32: None},
    # the fused refit and apply (one launch per stack): not measured on a GPU yet, so
    # `use_kernels="auto"` never picks them; `use_kernels=True` does.
    "fused_factor_refit": {1: None, 8: None, 32: None},
    "fused_kron_apply": {1: None, 8: None, 32: None},
}


def should_use_kernel(op: str, n: int, batch: int, backend: str = "gpu") -> bool:
    """Whether the Pallas kernel of `op` is expected to beat the jnp reference.

    A lookup in a table of measurements (`KERNEL_MIN_N`, H100 only so far); the nearest
    measured stack size at or below `batch` is used. TPU has not been measured: `False`.
    `psgd_eqx`'s optimizers consult it under `use_kernels="auto"` for
    `"eq_factor_update"`, `"fused_factor_refit"` and `"fused_kron_apply"`, with the size
    of the stack the update runs on (a scanned stack, a bucket of same-shape leaves,
    blocks: the product of the enclosing `vmap`s); only `"eq_factor_update"` has a measured
    win so far, so it is the only one `"auto"` ever picks.

    **Arguments:**

    - `op`: `"eq_factor_update"`, `"pro_factor_update"`, `"kron_apply"`,
        `"fused_factor_refit"` or `"fused_kron_apply"`.
    - `n`: the factor size (the larger dim of the gradient matrix for `kron_apply`).
    - `batch`: the number of stacked factors.
    - `backend`: `"gpu"` or `"tpu"`.

    **Returns:** `True` to dispatch to the kernel, `False` for the reference.
    """
    if op not in KERNEL_MIN_N:
        raise ValueError(f"`op` must be one of {tuple(KERNEL_MIN_N)}; got {op!r}.")
    check_backend(backend)
    if backend != "gpu":
        return False
    table = KERNEL_MIN_N[op]
    sizes = sorted(b for b in table if b <= max(batch, 1))
    key = sizes[-1] if sizes else min(table)
    threshold = table[key]
    return threshold is not None and n >= threshold
