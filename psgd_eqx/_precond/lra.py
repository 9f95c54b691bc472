from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .. import _rng
from .._geometry import diag_step
from .._norms import Normaliser
from .._numerics import compute_dtype, is_complex, promote, real_dtype
from .base import AbstractPrecond, as_shape, check_shape, flat_size


def _ip_uvt(u: Array, v: Array, x: Array) -> Array:
    """(I + U Vᵀ) x."""
    return x + u @ (v.T @ x)


def _balance_uv(u: Array, vm: Array) -> tuple[Array, Array]:
    """U, V moved approximately towards UᵀU = VᵀV; UVᵀ (hence P) is unchanged to O(E⁴)."""
    utu, vtv = u.T @ u, vm.T @ vm
    tr_u, tr_v = jnp.trace(utu), jnp.trace(vtv)
    ok = (tr_u > 0) & (tr_v > 0)
    rho = jnp.where(ok, (tr_u / jnp.where(ok, tr_v, 1.0)) ** 0.25, 1.0)
    rho2 = rho * rho
    e = 0.1 * (utu / rho2 - vtv * rho2) / jnp.where(ok, tr_u / rho2 + tr_v * rho2, 1.0)
    e2 = 0.5 * e @ e
    u, vm = u / rho, vm * rho
    return u - u @ (e - e2), vm + vm @ (e + e2)


def _products(u: Array, vm: Array, d: Array, x: Array, probe: Array) -> tuple[Array, ...]:
    """Q·h, P·h, Q⁻ᵀ·v and P⁻¹·v, and I + VᵀU (for the U/V gradients).

    Q⁻ᵀ = diag(1/d)(I + V Uᵀ)⁻¹ by Woodbury with one r×r LU (the reference's solve)."""
    r = u.shape[1]
    qh = _ip_uvt(u, vm, d * x)
    ph = d * _ip_uvt(vm, u, qh)
    ip_vtu = jnp.eye(r, dtype=u.dtype) + vm.T @ u
    lu = jsl.lu_factor(ip_vtu)
    inv_qt_v = probe / d
    inv_qt_v = inv_qt_v - vm @ jsl.lu_solve(lu, u.T @ inv_qt_v, trans=1)
    inv_p_v = (inv_qt_v - u @ jsl.lu_solve(lu, vm.T @ inv_qt_v)) / d
    return qh, ph, inv_qt_v, inv_p_v, ip_vtu


def _step_u_or_v(u, vm, a, b, ip_vtu, l_u, l_v, lr, key, normaliser: Normaliser):
    """U or V (a coin flip) along its own normalised gradient of the fit, with
    a = Q·h and b = Q⁻ᵀ·v as columns; returns the new (U, V, L_U, L_V)."""

    def step_u(_):
        atv, btv = a.T @ vm, b.T @ vm
        ell = (jnp.linalg.norm(a) * jnp.linalg.norm(atv @ vm.T)
               + jnp.linalg.norm(b) * jnp.linalg.norm(btv @ vm.T))
        new_l, eta = normaliser.step(l_u, ell, lr)
        grad = a @ (atv @ ip_vtu) - b @ (btv @ ip_vtu)
        return u - eta * grad, vm, new_l, l_v

    def step_v(_):
        atu, btu = a.T @ u, b.T @ u
        uuta, uutb = u @ atu.T, u @ btu.T
        ell = (jnp.linalg.norm(a) * jnp.linalg.norm(uuta)
               + jnp.linalg.norm(b) * jnp.linalg.norm(uutb))
        new_l, eta = normaliser.step(l_v, ell, lr)
        grad = (a + vm @ atu.T) @ atu - (b + vm @ btu.T) @ btu
        return u, vm - eta * grad, l_u, new_l

    return jax.lax.cond(_rng.bernoulli(key), step_u, step_v, None)


class LRAQ(AbstractPrecond):
    """Low-rank-approximation preconditioner Q = (I + U Vᵀ) diag(d) (the reference's LRA).

    Rank r (`rank=0` is a diagonal Q), memory n·(2r + 1). Fitted with the dQ = E·Q rule of
    the reference: d moves by the shared diagonal geometry step, then either U or V (a coin
    flip per refit) moves along its own normalised gradient; U and V are approximately
    balanced (UᵀU ≈ VᵀV) before every step. Q⁻ᵀv uses an r×r LU solve in single precision
    or wider. Real parameters only.

    Fields: `u`, `v` (n, r), `d` (n,), `lipschitz` = (L_U, L_V, L_d) in f32.
    """

    u: Shaped[Array, "n r"]
    v: Shaped[Array, "n r"]
    d: Shaped[Array, " n"]
    lipschitz: Float[Array, "3"]
    shape: tuple[int, ...] = eqx.field(static=True)
    _guards_finite: ClassVar[bool] = True

    def __check_init__(self):
        n = flat_size(self.shape)
        r = self.u.shape[-1] if self.u.ndim == 2 else -1
        if self.u.shape != (n, r) or self.v.shape != (n, r) or self.d.shape != (n,):
            raise ValueError(
                f"`LRAQ` needs u, v of shape (n, r) and d of shape (n,) with n = {n}; got "
                f"{self.u.shape}, {self.v.shape}, {self.d.shape}."
            )
        if self.lipschitz.shape != (3,):
            raise ValueError(
                f"`LRAQ(lipschitz=...)` must have shape (3,); got {self.lipschitz.shape}."
            )

    @classmethod
    def init(
        cls,
        shape: tuple[int, ...] | int,
        dtype=jnp.float32,
        *,
        rank: int = 10,
        init_scale: float | ArrayLike = 1.0,
        key: PRNGKeyArray | None = None,
    ) -> "LRAQ":
        """Q = `init_scale`·I: d = init_scale, U small random, V = 0.

        **Arguments:**

        - `shape`: the parameter's shape, or its number of elements n.
        - `dtype`: storage dtype (real).
        - `rank`: r, the rank of the low-rank part, `0 <= rank < n` (0: diagonal).
        - `init_scale`: the initial scale of Q.
        - `key`: randomness for U (default `PRNGKey(0)`).

        **Returns:** the preconditioner.
        """
        shape = as_shape(shape)
        n = flat_size(shape)
        if is_complex(dtype):
            raise ValueError(f"`LRAQ` supports real dtypes only; got dtype={jnp.dtype(dtype)}.")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < max(n, 1):
            raise ValueError(f"`rank` must be an int in [0, {n}) for n = {n}; got {rank!r}.")
        key = jax.random.PRNGKey(0) if key is None else key
        # ‖U‖_F = √0.1 as the reference, but V = 0 (the reference draws V like U): Q is
        # then exactly init_scale·I, and the first V step moves along (aaᵀ − bbᵀ)U, the
        # fit's gradient projected on U's span. U and V are rebalanced once V is non-zero.
        u = jax.random.normal(key, (n, rank), jnp.float32)
        u = u * (0.1**0.5 / jnp.maximum(jnp.linalg.norm(u), 1e-30))
        u = u.astype(dtype)
        v = jnp.zeros((n, rank), dtype)
        d = jnp.full((n,), jnp.asarray(init_scale, jnp.float32).astype(dtype), dtype)
        return cls(u, v, d, jnp.zeros((3,), real_dtype(compute_dtype(dtype))), shape)

    @property
    def rank(self) -> int:
        """The rank r of the low-rank part."""
        return self.u.shape[1]

    @property
    def needs_v(self) -> bool:
        # The LRA fit has no integrated-out form: whitening samples v as the reference.
        return True

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g = d ⊙ (I + V Uᵀ)(I + U Vᵀ)(d ⊙ g).

        **Arguments:**

        - `g`: an array of the parameter's shape.

        **Returns:** P·g with the shape and dtype of `g`.
        """
        check_shape("LRAQ.apply", self.shape, g.shape)
        dtype = promote(self.d.dtype, g.dtype)
        u, v, d = (x.astype(dtype) for x in (self.u, self.v, self.d))
        x = d * g.reshape(-1).astype(dtype)
        if self.rank:
            x = _ip_uvt(v, u, _ip_uvt(u, v, x))
        return (d * x).reshape(g.shape).astype(g.dtype)

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "LRAQ":
        """d by the shared diagonal rule, then U or V; only the Lipschitz EMA of
        `normaliser` is used (the LRA norm bounds are closed-form)."""
        del balance_probability  # U and V are balanced at every step
        assert v is not None  # `needs_v`: `update` has checked it
        cd = compute_dtype(promote(self.d.dtype, h.dtype))
        rd = real_dtype(cd)
        u, vm, d = (x.astype(cd) for x in (self.u, self.v, self.d))
        x = h.reshape(-1).astype(cd)
        probe = v.reshape(-1).astype(cd)
        lips = self.lipschitz.astype(rd)
        lr = jnp.asarray(lr, rd)
        if self.rank:
            u, vm = _balance_uv(u, vm)
            qh, ph, inv_qt_v, inv_p_v, ip_vtu = _products(u, vm, d, x, probe)
        else:
            qh = d * x
            ph = d * qh
            inv_qt_v = probe / d
            inv_p_v = inv_qt_v / d

        # d: the shared diagonal rule with T₁ = h⊙Ph, T₂ = v⊙P⁻¹v (these can be negative
        # elementwise, so ℓ uses their max-abs rather than `diag_lipschitz`).
        t1, t2 = ph * x, probe * inv_p_v
        ell_d = jnp.max(jnp.abs(t1)) + jnp.max(jnp.abs(t2))
        l_d, eta_d = normaliser.step(lips[2], ell_d, lr)
        d_new = diag_step("EQ", d, t1, t2, eta_d)
        l_u, l_v = lips[0], lips[1]
        if self.rank:
            u, vm, l_u, l_v = _step_u_or_v(u, vm, qh[:, None], inv_qt_v[:, None], ip_vtu,
                                           l_u, l_v, lr, key, normaliser)
        return LRAQ(
            u.astype(self.u.dtype),
            vm.astype(self.v.dtype),
            d_new.astype(self.d.dtype),
            jnp.stack([l_u, l_v, l_d]).astype(self.lipschitz.dtype),
            self.shape,
        )

    def rescale(self, scale: ArrayLike) -> "LRAQ":
        """Q ← scale·Q (d is scaled; U, V unchanged).

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `LRAQ`.
        """
        s = jnp.asarray(scale, real_dtype(self.lipschitz.dtype)).astype(self.d.dtype)
        return LRAQ(self.u, self.v, self.d * s, self.lipschitz, self.shape)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P = QᵀQ as a dense matrix over the flattened parameter.

        **Returns:** an `(N, N)` array.
        """
        cd = compute_dtype(self.d.dtype)
        n = flat_size(self.shape)
        u, v, d = (x.astype(cd) for x in (self.u, self.v, self.d))
        q = (jnp.eye(n, dtype=cd) + u @ v.T) * d[None, :]
        return q.T @ q
