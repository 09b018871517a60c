"""The bound catalogue (THEORY.md §7) and its numerical toolkit, in float64.

Every function is a small pure function of numbers the engine already has. All
are ``jit``- and ``vmap``-safe: no Python control flow on traced values, no
``while_loop`` (a vmapped while-loop runs until its slowest lane), and every
iterative solve is a fixed-length ``lax.fori_loop`` bisection. Scalar arguments
broadcast elementwise unless a docstring gives shapes. Inputs are cast to
float64 here (``jnp.asarray(x, jnp.float64)``), so callers may pass float32
simulation outputs; results are float64.

Sources: [A] Li et al., arXiv 2601.16403; [B] Tang, Chen, He, arXiv 2602.21765;
[E] this project's own derivation, written out in ``docs/theory.md``.

Conventions used throughout:

* δ is the failure probability of a bound; every split of δ is stated in the
  docstring that makes it.
* W_τ = (range of r̂) + 2β·min(τ, L_ℓ) is the width of the interval that holds
  every per-rollout term r̂ − βℓ^τ_w, where L_ℓ is an a-priori bound on |ℓ_w|
  (e.g. ``log_ratio_range``: 2C‖w − w_ref‖). Bounds that need W_τ are only as
  valid as the range they are given.
* ∞ is a legal value for τ, L_ℓ and for the c of a kl-inversion; the result is
  then the vacuous bound (∞, or 1 / 0 for probabilities), never NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

# Idempotent; the package __init__ does the same. Bounds are float64 (THEORY.md §9).
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.scipy.linalg import solve_triangular  # noqa: E402
from jax.scipy.special import betainc  # noqa: E402

__all__ = [
    "BISECTION_ITERATIONS",
    "LAMBDA_GRID_EXPONENTS",
    "kl_bernoulli",
    "kl_inverse_upper",
    "kl_inverse_lower",
    "gaussian_kl",
    "sampling_alpha",
    "clip_objective",
    "optimal_clip_threshold",
    "tail_threshold",
    "rollout_sampling_objective",
    "rollouts_per_prompt",
    "integer_rollouts_per_prompt",
    "preference_objective",
    "preference_share",
    "mcallester_bound",
    "maurer_bound",
    "default_lambda_grid",
    "hoeffding_lambda_bound",
    "occam_grid_size",
    "occam_log_cardinality",
    "occam_quantize",
    "log_ratio_range",
    "objective_range",
    "B1Terms",
    "b1_terms",
    "B2Terms",
    "b2_sampling_bound",
    "mc_error_hoeffding",
    "logistic_derivative",
    "RewardCertificate",
    "certified_reward_error",
    "lyapunov_continuous",
    "lyapunov_discrete",
    "clopper_pearson_upper",
    "clopper_pearson_lower",
    "clopper_pearson_interval",
]

#: Bisection steps of every inversion on [0, 1]. The bracket halves each step, so
#: after 60 steps it is at most 2^-60 ≈ 8.7e-19 wide in exact arithmetic; in float64
#: it stops shrinking at one ulp of the answer (≤ 1.1e-16), which is the real resolution.
BISECTION_ITERATIONS = 60

_F64 = jnp.float64
#: Exponents j of the default λ grid λ_j = (√(8 n_terms)/W)·2^j of ``default_lambda_grid``.
LAMBDA_GRID_EXPONENTS = tuple(range(-10, 11))
# Relative slack when counting grid points, so that a 2R/ε that is an integer in exact
# arithmetic but rounds just below it in float64 is still counted (can only overcount).
_GRID_COUNT_SLACK = 1e-9


def _f64(x) -> jax.Array:
    return jnp.asarray(x, _F64)


def _bisect_unit_interval(below, shape):
    """Fixed-step bisection on [0, 1] for a predicate that is True on [0, t) and False after.

    ``below(p)`` must be monotone (True then False) in p. Starts from the fixed bracket
    [0, 1] whatever the problem, so the midpoints are the same dyadic points for every
    lane and the returned ends are monotone functions of the crossing point t.
    Returns (lo, hi) with below(lo) True (or lo = 0) and below(hi) False (or hi = 1),
    hence lo ≤ t ≤ hi and hi − lo ≤ 2^-BISECTION_ITERATIONS.
    """

    def step(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        go_right = below(mid)
        return jnp.where(go_right, mid, lo), jnp.where(go_right, hi, mid)

    init = (jnp.zeros(shape, _F64), jnp.ones(shape, _F64))
    return lax.fori_loop(0, BISECTION_ITERATIONS, step, init)


# ---------------------------------------------------------------------------------------
# Divergences and their inverses
# ---------------------------------------------------------------------------------------


def _x_log_x_over_y(x, y, x_minus_y):
    """x·log(x/y) ≥ −∞ for x, y ∈ [0, 1], with 0·log(0/y) = 0 and x·log(x/0) = +∞ (x > 0).

    ``x_minus_y`` is passed in because the caller can form it without cancellation. Near
    x = y it uses log1p((x − y)/y) (absolute error O(eps·|x − y|)); for x ≤ y/2, where
    1 + (x − y)/y would lose all its digits, log x − log y.
    """
    y_pos = jnp.where(y > 0, y, 1.0)
    x_pos = jnp.where(x > 0, x, 1.0)
    log_ratio = jnp.where(x > 0.5 * y, jnp.log1p(x_minus_y / y_pos), jnp.log(x_pos) - jnp.log(y_pos))
    return jnp.where(x > 0, jnp.where(y > 0, x * log_ratio, jnp.inf), 0.0)


def kl_bernoulli(q, p) -> jax.Array:
    """Binary relative entropy kl(q‖p) = q log(q/p) + (1 − q) log((1 − q)/(1 − p)).

    Conventions: 0·log(0/·) = 0; kl = +∞ when p ∈ {0, 1} and q ≠ p. Each term is computed
    from the exact difference p − q with ``log1p`` where q/p (or (1 − q)/(1 − p)) is near 1,
    so that for p close to q the absolute rounding error is O(eps·|p − q|) rather than
    O(eps), and from log-differences where the ratio is small. Inputs outside [0, 1] are
    outside the domain. Elementwise, broadcasting.
    """
    q, p = jnp.broadcast_arrays(_f64(q), _f64(p))
    value = _x_log_x_over_y(q, p, q - p) + _x_log_x_over_y(1.0 - q, 1.0 - p, p - q)
    return jnp.maximum(value, 0.0)


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def kl_inverse_upper(q, c) -> jax.Array:
    """kl⁻¹₊(q, c) = max{p ∈ [q, 1] : kl(q‖p) ≤ c} (Langford–Seeger / Maurer inversion).

    Fixed 60-step bisection on the bracket [0, 1] with the monotone predicate
    "p ≤ q or kl(q‖p) ≤ c"; returns the bracket's *upper* end, so the result is ≥ the
    exact value and exceeds it by at most 2^-60 (one float64 ulp in practice).
    Exact cases: q = 0 → 1 − e^{−c}; q = 1 → 1; c ≤ 0 → q; c = ∞ → 1.
    q ∈ [0, 1], c ≥ 0; elementwise, broadcasting. Monotone non-decreasing in q and c.
    """
    q, c = jnp.broadcast_arrays(_f64(q), _f64(c))
    _, hi = _bisect_unit_interval(lambda p: (p <= q) | (kl_bernoulli(q, p) <= c), q.shape)
    out = jnp.where(q <= 0, -jnp.expm1(-c), hi)
    out = jnp.where(q >= 1, 1.0, out)
    return jnp.where(c <= 0, q, out)


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def kl_inverse_lower(q, c) -> jax.Array:
    """kl⁻¹₋(q, c) = min{p ∈ [0, q] : kl(q‖p) ≤ c}.

    Fixed 60-step bisection on [0, 1] with the monotone predicate "p < q and
    kl(q‖p) > c"; returns the bracket's *lower* end, so the result is ≤ the exact
    value, by at most 2^-60 (one float64 ulp in practice).
    Exact cases: q = 0 → 0; q = 1 → e^{−c}; c ≤ 0 → q; c = ∞ → 0.
    q ∈ [0, 1], c ≥ 0; elementwise, broadcasting. Non-increasing in c, non-decreasing in q.
    """
    q, c = jnp.broadcast_arrays(_f64(q), _f64(c))
    lo, _ = _bisect_unit_interval(lambda p: (p < q) & (kl_bernoulli(q, p) > c), q.shape)
    out = jnp.where(q <= 0, 0.0, lo)
    out = jnp.where(q >= 1, jnp.exp(-c), out)
    return jnp.where(c <= 0, q, out)


def gaussian_kl(mean_q, cov_q, mean_p, cov_p) -> jax.Array:
    """KL(N(m_q, Σ_q) ‖ N(m_p, Σ_p)) for full covariances.

    KL = ½[tr(Σ_p⁻¹Σ_q) + (m_p − m_q)ᵀΣ_p⁻¹(m_p − m_q) − d + log det Σ_p − log det Σ_q],
    computed with Cholesky factors L_p, L_q: tr(Σ_p⁻¹Σ_q) = ‖L_p⁻¹L_q‖²_F, the quadratic
    form is ‖L_p⁻¹(m_p − m_q)‖², log det Σ = 2 Σ log diag L.
    Shapes: means ``[d]``, covariances ``[d, d]`` (symmetric) → scalar; vmap for batches.
    If either covariance is not numerically positive definite (Cholesky fails), the KL
    is +∞ — the right value for a singular PSD covariance (e.g. Σ_OU = 0 when C_g = 0).
    """
    mean_q, cov_q, mean_p, cov_p = map(_f64, (mean_q, cov_q, mean_p, cov_p))
    d = mean_q.shape[-1]
    chol_q = jnp.linalg.cholesky(cov_q)
    chol_p = jnp.linalg.cholesky(cov_p)
    ratio = solve_triangular(chol_p, chol_q, lower=True)
    shift = solve_triangular(chol_p, mean_p - mean_q, lower=True)
    diag_q, diag_p = jnp.diagonal(chol_q), jnp.diagonal(chol_p)
    logdet_gap = 2.0 * (jnp.sum(jnp.log(diag_p)) - jnp.sum(jnp.log(diag_q)))
    value = 0.5 * (jnp.sum(ratio**2) + jnp.sum(shift**2) - d + logdet_gap)
    ok = (jnp.all(jnp.isfinite(chol_q)) & jnp.all(jnp.isfinite(chol_p))
          & jnp.all(diag_q > 0) & jnp.all(diag_p > 0))
    return jnp.where(ok, jnp.maximum(value, 0.0), jnp.inf)


# ---------------------------------------------------------------------------------------
# B3: the optimal clipping threshold
# ---------------------------------------------------------------------------------------


def sampling_alpha(n, K, delta) -> jax.Array:
    """α = √(log(4/δ)/2n) + √(log(4/δ)/2nK), the confidence factor of B1's sampling term [B, Thm 1].

    Two-sided Hoeffding at δ/2 over n prompts plus δ/2 over the nK rollouts given the
    prompts. K = ∞ (exact expectations over responses) drops the second term. Elementwise.
    """
    n, K, delta = _f64(n), _f64(K), _f64(delta)
    log_term = jnp.log(4.0 / delta)
    return jnp.sqrt(log_term / (2.0 * n)) + jnp.sqrt(log_term / (2.0 * n * K))


def _ordered_keys(x: jax.Array) -> jax.Array:
    """Unsigned integer keys with the order of the float values ``x`` (the radix-sort map: set
    the sign bit of non-negative floats, flip every bit of negative ones). float32 values keep
    32-bit keys (3 radix passes instead of 6); anything else is read as float64."""
    if x.dtype != jnp.float32:
        x = _f64(x)
    utype = jnp.uint32 if x.dtype == jnp.float32 else jnp.uint64
    bits = lax.bitcast_convert_type(x, utype)
    sign = jnp.asarray(1, utype) << jnp.asarray(8 * x.dtype.itemsize - 1, utype)
    return jnp.where(bits & sign, ~bits, bits | sign)


def _from_ordered_keys(keys: jax.Array) -> jax.Array:
    """The inverse of :func:`_ordered_keys`: the float (float32 for 32-bit keys, else float64)
    with these keys, bit for bit (no arithmetic, so subnormals survive XLA's flush-to-zero)."""
    utype = keys.dtype
    ftype = jnp.float32 if utype == jnp.uint32 else _F64
    sign = jnp.asarray(1, utype) << jnp.asarray(8 * keys.dtype.itemsize - 1, utype)
    return lax.bitcast_convert_type(jnp.where(keys & sign, keys ^ sign, ~keys), ftype)


def _f64_exact(x: jax.Array) -> jax.Array:
    """``x`` as float64; float32 is widened by bit manipulation, exact for every value.

    XLA's CPU backend runs with denormals-are-zero, so ``x.astype(float64)`` turns a float32
    subnormal (|x| < 2^-126) into 0 although float64 holds it exactly as a normal number. Here
    the float64 fields are built from the float32 ones: sign as is, exponent rebiased
    (127 → 1023; 255 → 2047 for inf/NaN), mantissa shifted left by 29; a subnormal m·2^-149
    (0 < m < 2^23) is renormalised as 1.f·2^(p−149), p the position of m's leading bit.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        return _f64(x)
    u64 = jnp.uint64
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    man32 = bits & jnp.uint32(0x7FFFFF)
    sign = (bits >> 31).astype(u64) << 63
    exp = ((bits >> 23) & jnp.uint32(0xFF)).astype(u64)
    man = man32.astype(u64)
    lead = (31 - lax.clz(man32)).astype(u64)  # position of the leading bit (garbage when man = 0)
    sub_exp = lead + (1023 - 149)
    sub_man = (man << (u64(52) - lead)) & u64((1 << 52) - 1)
    exp64 = jnp.where(exp == 0, jnp.where(man == 0, u64(0), sub_exp),
                      jnp.where(exp == 0xFF, u64(0x7FF), exp + (1023 - 127)))
    man64 = jnp.where(exp == 0, jnp.where(man == 0, u64(0), sub_man), man << 29)
    return lax.bitcast_convert_type(sign | (exp64 << 52) | man64, _F64)


#: Key bits resolved per histogram pass of :func:`tail_threshold`: 2^11 = 2048 buckets a pass, so
#: 3 passes for float32 keys (11 + 11 + 10 bits) and 6 for float64 keys. Measured at W1 shape
#: (16,384 atoms, 6 levels): 8 bits (4 passes) and 10 bits were slower, 16 bits far slower.
_RADIX_BITS = 11
#: A pass's 2048 buckets are scanned as 64 blocks of 32 (block totals first, then one block).
_RADIX_BLOCK = 32


def _first_or_last(ok: jax.Array, nonempty: jax.Array) -> jax.Array:
    """Along the last axis: the index of the first True of ``ok``; where there is none, the
    index of the last True of ``nonempty``."""
    n = ok.shape[-1]
    first = jnp.argmax(ok, axis=-1)
    last = n - 1 - jnp.argmax(nonempty[..., ::-1], axis=-1)
    return jnp.where(jnp.any(ok, axis=-1), first, last)


def _strictly_after(n: int) -> jax.Array:
    """``[n, n]`` float64 matrix G with G[i, j] = 1[i > j]: (h @ G)[j] = Σ_{i > j} h[i]."""
    i = jnp.arange(n)
    return (i[:, None] > i[None, :]).astype(_F64)


def _select_bucket(hist, above, mass):
    """One level's bucket of one radix pass, for every level at once.

    ``hist`` ``[L, B]`` holds the mass of each bucket of the interval of keys that level ℓ is in
    (buckets in key order), ``above`` ``[L]`` the mass of all atoms above that interval. Returns
    the smallest bucket j that holds mass and has P(V > end of j) = above + Σ_{i > j} hist[i] ≤
    mass, or the last bucket holding mass if none does; and P(V > end of j) for it.

    The suffix sums are taken in two levels (totals of blocks of ``_RADIX_BLOCK`` buckets, then
    the buckets of the one block that holds the answer), each a small matrix product with
    :func:`_strictly_after`. A block qualifies exactly when its last non-empty bucket does, so the
    two-level search finds the same bucket as a flat one. Buckets after the last non-empty one
    add exact zeros: the last non-empty bucket of an interval reports exactly ``above``.
    """
    n_levels, n_buckets = hist.shape
    n_blocks = n_buckets // _RADIX_BLOCK
    blocks = hist.reshape(n_levels, n_blocks, _RADIX_BLOCK)
    totals = jnp.sum(blocks, axis=-1)
    after_block = above[:, None] + totals @ _strictly_after(n_blocks)
    blk = _first_or_last((totals > 0) & (after_block <= mass[:, None]), totals > 0)
    inner = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]
    above = jnp.take_along_axis(after_block, blk[:, None], axis=1)[:, 0]
    after = above[:, None] + inner @ _strictly_after(_RADIX_BLOCK)
    j = _first_or_last((inner > 0) & (after <= mass[:, None]), inner > 0)
    return blk * _RADIX_BLOCK + j, jnp.take_along_axis(after, j[:, None], axis=1)[:, 0]


def _radix_tail_keys(keys, w, mass):
    """Key of the smallest atom with P(V > atom) ≤ mass, per level: an MSD radix select.

    ``keys`` ``[N]`` (:func:`_ordered_keys`), ``w`` ``[N]`` float64 weights ≥ 0 summing to 1,
    ``mass`` ``[L]``. The key bits are split into digits of ``_RADIX_BITS`` from the top; pass k
    narrows each level's interval of keys to one bucket of digit k, so after the last pass the
    interval is a single key. Pass 0 is one histogram (a scatter-add of the weights by top
    digit) shared by all levels; each later pass is again one scatter-add over the N atoms, into
    one row of buckets per distinct interval that some level is in (≤ L rows): an atom goes to
    the row of the interval it lies in, or nowhere. So the work is a few O(N) scatters and
    gathers in all, whatever the number of levels, where bisection needs L·(key bits) masked sums.
    (On the CPU a scatter-add sums in a fixed order; a GPU's atomic adds may not, which can only
    matter where a cumulative mass lies within round-off of a level.)
    """
    utype = keys.dtype
    n_bits = 8 * keys.dtype.itemsize
    n_buckets = 1 << _RADIX_BITS
    n_levels = mass.shape[0]
    passes = -(-n_bits // _RADIX_BITS)
    shifts = [_RADIX_BITS * (passes - 1 - k) for k in range(passes)]  # static, disjoint digits

    def digit(shift):
        d = (keys >> jnp.asarray(shift, utype)) & jnp.asarray(n_buckets - 1, utype)
        return d.astype(jnp.int32)

    d = digit(shifts[0])
    hist = jnp.zeros(n_buckets, _F64).at[d].add(w, mode="promise_in_bounds")
    bucket, above = _select_bucket(jnp.broadcast_to(hist, (n_levels, n_buckets)), jnp.zeros(n_levels, _F64), mass)
    key = bucket.astype(utype) << jnp.asarray(shifts[0], utype)
    level_row = jnp.zeros(n_levels, jnp.int32)  # the histogram row of each level's interval
    atom_row = jnp.zeros(keys.shape, jnp.int32)  # the row of each atom's interval, −1 for none
    rows = 1
    levels = jnp.arange(n_levels, dtype=jnp.int32)
    for shift in shifts[1:]:
        # Number the chosen buckets: a bucket chosen by several levels gets one of their indices
        # (whichever write lands last) and all of them read that same entry back, so they share a row ...
        table = jnp.full(rows * n_buckets, -1, jnp.int32).at[level_row * n_buckets + bucket].set(levels)
        level_row = table[level_row * n_buckets + bucket]
        # ... and send each atom to the row of its bucket, if that bucket was chosen.
        atom_row = jnp.where(atom_row >= 0, table[jnp.maximum(atom_row, 0) * n_buckets + d], -1)
        d = digit(shift)
        inside = atom_row >= 0  # atoms outside every chosen bucket add an exact 0 to row 0
        hist = jnp.zeros(n_levels * n_buckets, _F64).at[jnp.maximum(atom_row, 0) * n_buckets + d].add(
            jnp.where(inside, w, 0.0), mode="promise_in_bounds").reshape(n_levels, n_buckets)
        bucket, above = _select_bucket(hist[level_row], above, mass)
        key = key | (bucket.astype(utype) << jnp.asarray(shift, utype))
        rows = n_levels
    return key


def tail_threshold(values, weights, mass, keep_dtype: bool = False) -> jax.Array:
    """The smallest atom t of the discrete law Σ weights·δ_values with P(V > t) ≤ ``mass``.

    Equivalently the lower (1 − mass)-quantile, inf{t : P(V ≤ t) ≥ 1 − mass}. ``values`` and
    ``weights`` have any common shape (flattened; weights ≥ 0 normalised to sum 1, zero weights
    allowed and never returned), ``mass`` is a scalar or a vector of levels. With mass ≥ 1 the
    result is the smallest atom of positive weight; with mass < 0 (or NaN) the largest.

    Exact, and no sort (a sort of 10⁴ atoms per problem dominated the engine's evaluation):
    an MSD radix select on the order-preserving integer keys of the atoms (32-bit keys for
    float32 values, else 64-bit of the values read as float64), see :func:`_radix_tail_keys`.
    Every pass picks, for each level, the first bucket of keys whose upper end has P(V > end)
    ≤ mass among the buckets holding mass; the atom sought lies in it, and the last pass's
    bucket is a single key, the key of an atom of positive weight. Masses are float64 sums, as
    with a direct evaluation of P(V > t); only where a cumulative mass lies within float64
    round-off of the level could the summation order pick the neighbouring atom.

    The atom is read back by inverting the key map, bit-exact. Returns float64, widened exactly
    from float32 values (subnormals included); with ``keep_dtype`` the atom in the values' own
    float dtype (float32 for float32 values, else float64). One result per entry of ``mass``.
    """
    v = jnp.ravel(jnp.asarray(values))
    w = jnp.ravel(_f64_exact(weights))
    w = w / jnp.sum(w)
    w = jnp.where(w > 0, w, 0.0)
    keys = _ordered_keys(v)
    mass = _f64(mass)
    shape = mass.shape
    atoms = _from_ordered_keys(_radix_tail_keys(keys, w, jnp.ravel(mass))).reshape(shape)
    return atoms if keep_dtype else _f64_exact(atoms)


def _discrete_law(values, weights):
    """Flatten a discrete law of |ℓ| and normalise its weights to sum 1."""
    v = jnp.abs(jnp.ravel(_f64(values)))
    w = jnp.ravel(_f64(weights))
    return v, w / jnp.sum(w)


def clip_objective(tau, abs_log_ratio, weights, alpha, beta) -> jax.Array:
    """h(τ) = 2βατ + β E(|ℓ| − τ)_+, the τ-dependent part of B1 [B] (for τ ≤ L_ℓ).

    The expectation is under the discrete law with atoms ``abs_log_ratio`` (any shape,
    flattened; abs is taken) and probabilities ``weights`` (same shape; normalised to
    sum 1 here). ``tau`` may have any shape; the result has tau's shape.
    """
    v, w = _discrete_law(abs_log_ratio, weights)
    tau, alpha, beta = _f64(tau), _f64(alpha), _f64(beta)
    tail = jnp.sum(w * jnp.maximum(v - tau[..., None], 0.0), axis=-1)
    return 2.0 * beta * alpha * tau + beta * tail


def optimal_clip_threshold(abs_log_ratio, weights, n, K, delta) -> jax.Array:
    """B3 [B]: τ* = inf{t ≥ 0 : P(|ℓ| > t) ≤ 2α}, α = ``sampling_alpha(n, K, δ)``.

    This is the lower (1 − 2α)-quantile of |ℓ|: the smallest t with P(|ℓ| ≤ t) ≥ 1 − 2α.
    It minimises h(τ) = 2βατ + βE(|ℓ| − τ)_+ over τ ≥ 0 (β > 0): h is convex and piecewise
    linear with right derivative β(2α − P(|ℓ| > τ)), which is < 0 for τ < τ* and ≥ 0 at τ*.
    τ* = 0 when 2α ≥ 1. The law is discrete: atoms ``abs_log_ratio`` (any shape,
    flattened) with probabilities ``weights`` (same shape, normalised to sum 1), e.g.
    |ℓ_w(x_m, a)| with weight π_w(a|x_m)/M over an evaluation set. τ* is one of the atoms
    (or 0), is independent of β, and is non-decreasing in n, K and δ. Returns a scalar.
    The weights' scale does not matter: pass π_w(a|x_m) itself, as the catalogue does, to share the
    weight normalisation, keys and first radix pass with ``gap.weighted_quantiles`` of the same law.
    """
    v = jnp.abs(jnp.asarray(abs_log_ratio))  # float32 atoms keep 32-bit keys: 3 radix passes, not 6
    two_alpha = 2.0 * sampling_alpha(n, K, delta)
    tau = tail_threshold(v, weights, two_alpha)
    return jnp.where(two_alpha >= 1.0, 0.0, tau)


# ---------------------------------------------------------------------------------------
# B4: budget allocation
# ---------------------------------------------------------------------------------------


def rollout_sampling_objective(K, cost_prompt, cost_decode, budget=1.0, var_prompt=None,
                               var_rollout=None) -> jax.Array:
    """B1's sampling term per unit W_τ√(log(4/δ)/2), at n = budget/(c_p + K c_d) prompts [B4].

    Without variances: √(1/n) + √(1/(nK)) = √((c_p + K c_d)/budget)·(1 + K^{-1/2}).
    With variances (the standard deviation of Ĵ):
    √(σ²_prompt/n + σ²_roll/(nK)) = √((c_p + K c_d)/budget · (σ²_prompt + σ²_roll/K)).
    K is treated as a real number ≥ 1; n is not rounded. Elementwise.
    """
    K, cp, cd, budget = map(_f64, (K, cost_prompt, cost_decode, budget))
    per_prompt = (cp + K * cd) / budget
    if var_prompt is None or var_rollout is None:
        return jnp.sqrt(per_prompt) * (1.0 + 1.0 / jnp.sqrt(K))
    return jnp.sqrt(per_prompt * (_f64(var_prompt) + _f64(var_rollout) / K))


def rollouts_per_prompt(cost_prompt, cost_decode, var_prompt=None, var_rollout=None) -> jax.Array:
    """B4 [B]: continuous minimiser K* of ``rollout_sampling_objective`` under the budget.

    K* = max{1, (c_p/c_d)^{2/3}}: the objective's K-derivative has the sign of
    K^{3/2} − c_p/c_d (derivation in docs/theory.md; agrees with THEORY.md).
    Variance-aware: K* = max{1, √((c_p/c_d)·σ²_roll/σ²_prompt)}: the derivative of
    (c_p + K c_d)(σ²_p + σ²_r/K) has the sign of c_d σ²_p K² − c_p σ²_r.
    Both objectives are unimodal in K, so K* is the global minimiser on [1, ∞).
    σ²_prompt = 0 (or c_d = 0) gives K* = ∞. The budget does not enter. Elementwise.
    """
    ratio = _f64(cost_prompt) / _f64(cost_decode)
    if var_prompt is None or var_rollout is None:
        k = ratio ** (2.0 / 3.0)
    else:
        k = jnp.sqrt(ratio * _f64(var_rollout) / _f64(var_prompt))
    return jnp.maximum(1.0, k)


def integer_rollouts_per_prompt(cost_prompt, cost_decode, var_prompt=None, var_rollout=None) -> jax.Array:
    """Best integer K ≥ 1: ⌊K*⌋ or ⌈K*⌉, whichever gives the smaller objective (ties: ⌊K*⌋).

    Exact because the objective is unimodal in K (see ``rollouts_per_prompt``).
    Returned as an integer-valued float64 (∞ when K* = ∞). Elementwise.
    """
    k = rollouts_per_prompt(cost_prompt, cost_decode, var_prompt, var_rollout)
    k_lo, k_hi = jnp.floor(k), jnp.ceil(k)
    obj_lo = rollout_sampling_objective(k_lo, cost_prompt, cost_decode, 1.0, var_prompt, var_rollout)
    obj_hi = rollout_sampling_objective(k_hi, cost_prompt, cost_decode, 1.0, var_prompt, var_rollout)
    return jnp.where(obj_hi < obj_lo, k_hi, k_lo)


def preference_objective(share, a, b, cost_per_prompt, cost_pref, budget=1.0) -> jax.Array:
    """a/√n + b/√N_pref with n = (1 − s)·budget/c_n and N_pref = s·budget/c_pref [B4, E].

    s = ``share`` is the fraction of the budget spent on preference pairs; c_n = c_p + K c_d
    is the cost of one prompt with its K rollouts. A zero coefficient contributes 0.
    Elementwise.
    """
    s, a, b, cn, cpref, budget = map(_f64, (share, a, b, cost_per_prompt, cost_pref, budget))
    prompt_part = jnp.where(a > 0, a * jnp.sqrt(cn / ((1.0 - s) * budget)), 0.0)
    pref_part = jnp.where(b > 0, b * jnp.sqrt(cpref / (s * budget)), 0.0)
    return prompt_part + pref_part


def preference_share(a, b, cost_per_prompt, cost_pref) -> jax.Array:
    """B4 [E]: the budget share s* on preference data minimising ``preference_objective``.

    s* = b^{2/3} c_pref^{1/3} / (a^{2/3} c_n^{1/3} + b^{2/3} c_pref^{1/3}) (Lagrangian in
    docs/theory.md; agrees with THEORY.md). The minimum value is
    (a^{2/3} c_n^{1/3} + b^{2/3} c_pref^{1/3})^{3/2}/√budget. Typical use: a = W_τ·α·√n
    (B1's sampling coefficient), b = √((1 + χ²) κ_pref) with L²_train ≈ κ_pref/N_pref.
    a, b ≥ 0; a = b = 0 (nothing to trade) returns 0. Elementwise.
    """
    a, b, cn, cpref = map(_f64, (a, b, cost_per_prompt, cost_pref))
    prompt_weight = a ** (2.0 / 3.0) * cn ** (1.0 / 3.0)
    pref_weight = b ** (2.0 / 3.0) * cpref ** (1.0 / 3.0)
    total = prompt_weight + pref_weight
    return jnp.where(total > 0, pref_weight / jnp.where(total > 0, total, 1.0), 0.0)


# ---------------------------------------------------------------------------------------
# PAC-Bayes toolkit
# ---------------------------------------------------------------------------------------


def _maurer_confidence(kl, n, delta):
    """c = (KL + log(2√n/δ))/n, the right-hand side of Maurer's kl bound."""
    n = _f64(n)
    return (_f64(kl) + jnp.log(2.0 * jnp.sqrt(n) / _f64(delta))) / n


def mcallester_bound(emp, kl, n, delta) -> jax.Array:
    """Square-root PAC-Bayes bound (McAllester 1999 in Maurer's 2004 form), losses in [0, 1].

    With probability ≥ 1 − δ over n i.i.d. samples, for all posteriors Q simultaneously,
    E_Q L ≤ E_Q L̂ + √((KL(Q‖P) + log(2√n/δ))/(2n)). ``emp`` = E_Q L̂. It is Pinsker's
    relaxation of ``maurer_bound``; the same δ covers both sides (emp − the same root is
    the matching lower bound). Not clipped to 1. Elementwise.
    """
    return _f64(emp) + jnp.sqrt(_maurer_confidence(kl, n, delta) / 2.0)


def maurer_bound(emp, kl, n, delta):
    """Maurer (2004) / Langford–Seeger kl PAC-Bayes bound, losses in [0, 1]; returns (lower, upper).

    With probability ≥ 1 − δ, for all Q: kl(E_Q L̂ ‖ E_Q L) ≤ c = (KL + log(2√n/δ))/n
    (valid for all n ≥ 1: E e^{n kl(L̂‖L)} ≤ ξ(n) ≤ 2√n). Both ends come from this one
    event, so the interval is two-sided at δ:
    lower = ``kl_inverse_lower(emp, c)``, upper = ``kl_inverse_upper(emp, c)``. Elementwise.
    """
    c = _maurer_confidence(kl, n, delta)
    return kl_inverse_lower(emp, c), kl_inverse_upper(emp, c)


def _lambda_grid_powers() -> jax.Array:
    return 2.0 ** jnp.asarray(LAMBDA_GRID_EXPONENTS, _F64)


def default_lambda_grid(n_terms, width) -> jax.Array:
    """The fixed λ grid of the Hoeffding PAC-Bayes-λ bound: λ_j = (√(8 n_terms)/W)·2^j, j = −10..10.

    The minimiser over λ > 0 of (KL + L)/λ + λW²/(8 n_terms) is √(8 n_terms (KL + L))/W, so
    this grid covers KL + L ∈ [2^-20, 2^20] with a factor-2 step; at the worst grid point the
    bound exceeds its continuous optimum by the factor (√2 + 1/√2)/2 ≈ 1.061, and the union
    bound costs log 21 ≈ 3.04 added to KL. It depends only on n_terms and W, which must be
    fixed before the data it is applied to. Shape: ``broadcast(n_terms, width) + [21]``.
    """
    n_terms, width = _f64(n_terms), _f64(width)
    scale = jnp.sqrt(8.0 * n_terms) / width
    return scale[..., None] * _lambda_grid_powers()


def hoeffding_lambda_bound(kl, n_terms, width, delta, lambdas=None) -> jax.Array:
    """One-sided Hoeffding PAC-Bayes-λ bound with a union bound over a λ grid [E; Catoni 2007].

    For n_terms independent (not necessarily identically distributed) terms, each in an
    interval of width W, and X(w) = their mean minus its expectation: with probability
    ≥ 1 − δ, for all Q,
    E_Q X ≤ min_{λ∈Λ} [(KL(Q‖P) + log(|Λ|/δ))/λ + λW²/(8·n_terms)].
    (Hoeffding's lemma, Donsker–Varadhan, Markov at δ/|Λ| per grid point.) The other side
    is the same bound for −X at another δ. ``lambdas``: shape ``[G]`` (or broadcastable
    ``[..., G]``), fixed before the data; default ``default_lambda_grid(n_terms, W)``.
    W = 0 gives 0. Scalars broadcast; returns the broadcast shape without the grid axis.
    """
    kl, n_terms, width, delta = map(_f64, (kl, n_terms, width, delta))
    if lambdas is None:
        # On the default grid λ_j W/√(8 n_terms) = 2^j, so the bound is
        # W/√(8 n_terms) · min_j [(KL + log(21/δ)) 2^-j + 2^j]: no overflow for tiny W.
        powers = _lambda_grid_powers()
        confidence = kl + jnp.log(powers.size / delta)
        scaled = jnp.min(confidence[..., None] / powers + powers, axis=-1)
        return width / jnp.sqrt(8.0 * n_terms) * scaled
    lam = _f64(lambdas)
    confidence = kl + jnp.log(lam.shape[-1] / delta)
    values = confidence[..., None] / lam + lam * (width**2 / (8.0 * n_terms))[..., None]
    return jnp.where(width > 0, jnp.min(values, axis=-1), 0.0)


def occam_grid_size(radius, spacing) -> jax.Array:
    """Points per coordinate of the grid {−R + kε : k = 0, 1, …} ∩ [−R, R]: ⌊2R/ε⌋ + 1.

    ⌊·⌋ is taken with a relative slack of 1e-9, so an exact-integer 2R/ε that rounds down
    in float64 is still counted; the slack can only overcount, which keeps the Occam KL
    conservative. Returned as an integer-valued float64. Elementwise.
    """
    ratio = 2.0 * _f64(radius) / _f64(spacing)
    return jnp.floor(ratio * (1.0 + _GRID_COUNT_SLACK)) + 1.0


def occam_log_cardinality(d, radius, spacing) -> jax.Array:
    """KL of a point mass under the uniform prior on Θ_ε [B, special case 1]: log|Θ_ε| = d·log m.

    m = ``occam_grid_size(R, ε)`` = ⌊2R/ε⌋ + 1 exactly (THEORY.md's d·log(2R/ε + 1) when
    2R/ε is an integer, smaller otherwise). Elementwise.
    """
    return _f64(d) * jnp.log(occam_grid_size(radius, spacing))


def occam_quantize(w, radius, spacing) -> jax.Array:
    """Nearest point of Θ_ε = {−R + kε}^d ∩ [−R, R]^d to w (coordinatewise, clipped to the box).

    k_i = clip(round((w_i + R)/ε), 0, m − 1), w_q,i = −R + k_i ε, m = ``occam_grid_size``.
    Shape: w ``[..., d]`` → same. The grid is a product, so the coordinatewise nearest point
    is the Euclidean nearest point.
    """
    w, radius, spacing = _f64(w), _f64(radius), _f64(spacing)
    m = occam_grid_size(radius, spacing)
    k = jnp.clip(jnp.round((w + radius) / spacing), 0.0, m - 1.0)
    return -radius + k * spacing


# ---------------------------------------------------------------------------------------
# B1 and B2
# ---------------------------------------------------------------------------------------


def log_ratio_range(feature_bound, weight_distance) -> jax.Array:
    """A-priori bound L_ℓ = 2C‖w − w_ref‖ on |ℓ_w(x, a)| for every x, a (‖φ‖ ≤ C).

    ℓ_w(x, a) = ⟨Δw, φ_a⟩ − log E_{b∼π_ref} e^{⟨Δw, φ_b⟩}, Δw = w − w_ref; both terms lie
    in [−C‖Δw‖, C‖Δw‖] (a log-mean-exp lies between the min and the max). Elementwise.
    """
    return 2.0 * _f64(feature_bound) * _f64(weight_distance)


def objective_range(reward_range, beta, tau, log_ratio_range=jnp.inf) -> jax.Array:
    """W_τ = reward_range + 2β·min(τ, L_ℓ): the width of an interval holding r̂ − βℓ^τ_w [B].

    ``reward_range`` = sup r̂ − inf r̂ (2‖θ̂‖C for r̂ = ⟨θ̂, φ⟩; 1 for rewards in [0, 1]).
    τ = L_ℓ = ∞ gives ∞. β = 0 gives reward_range (no 0·∞). Elementwise.
    """
    reward_range, beta = _f64(reward_range), _f64(beta)
    half_width = jnp.minimum(_f64(tau), _f64(log_ratio_range))
    return reward_range + jnp.where(beta > 0, 2.0 * beta * half_width, 0.0)


class B1Terms(NamedTuple):
    """The three terms of B1 and their sum (each broadcast to a common shape)."""

    sampling: jax.Array
    reward_shift: jax.Array
    clipping: jax.Array
    total: jax.Array


def b1_terms(reward_range, beta, tau, n, K, delta, chi2, l2_train, tail_excess,
             log_ratio_range=jnp.inf) -> B1Terms:
    """B1 [B, Thm 1]: for w fixed independently of the sample, with probability ≥ 1 − δ,

    |G(w)| ≤ W_τ·α  +  √(1 + χ²(D_w‖D_train))·√(L²_train)  +  β·E_{D_w}(|ℓ_w| − τ)_+
             (sampling)        (reward_shift)                     (clipping)

    W_τ = ``objective_range(reward_range, β, τ, log_ratio_range)``, α =
    ``sampling_alpha(n, K, δ)`` (δ/2 two-sided over prompts, δ/2 two-sided over rollouts
    given prompts). Only the sampling term is random; the others are population values.
    χ² is of the joint laws; with a shared prompt marginal it is E_x χ²(π_w(·|x)‖μ(·|x)).
    τ = L_ℓ = ∞ gives sampling = ∞. Scalars broadcast elementwise.
    """
    width = objective_range(reward_range, beta, tau, log_ratio_range)
    sampling = width * sampling_alpha(n, K, delta)
    reward_shift = jnp.sqrt(1.0 + _f64(chi2)) * jnp.sqrt(_f64(l2_train))
    beta = _f64(beta)
    clipping = jnp.where(beta > 0, beta * _f64(tail_excess), 0.0)
    sampling, reward_shift, clipping = jnp.broadcast_arrays(sampling, reward_shift, clipping)
    return B1Terms(sampling, reward_shift, clipping, sampling + reward_shift + clipping)


class B2Terms(NamedTuple):
    """B2's sampling part: prompt level (kl-inverse and square-root forms), rollout level, totals."""

    prompt: jax.Array
    prompt_sqrt: jax.Array
    rollout: jax.Array
    total: jax.Array
    total_sqrt: jax.Array


def b2_sampling_bound(emp_prompt_mean, kl, n, K, lo, width, delta, lambdas=None,
                      mc_radius=0.0) -> B2Terms:
    """B2 [B, Thm 2; exact form E]: w.p. ≥ 1 − δ, for all posteriors Q simultaneously,
    |E_Q Ĵ − E_Q EĴ| ≤ ``total``.

    Ĵ(w) − EĴ(w) = [Ĵ(w) − h̄_S(w)] + [h̄_S(w) − E_x h_w(x)], with
    h_w(x) = E_{a∼π_w}[r̂ − βℓ^τ_w](x) ∈ [lo, lo + W] and h̄_S(w) = (1/n)Σ_i h_w(x_i).

    δ split (total δ):
      * prompt level, δ/2, both sides from one event: Maurer's kl bound on the rescaled
        q̂ = (E_Q h̄_S − lo)/W ∈ [0, 1] with c = (KL + log(2√n/(δ/2)))/n;
        prompt = W·max(q̂ − kl⁻¹₋(q̂, c), kl⁻¹₊(q̂, c) − q̂);
        prompt_sqrt = W·√(c/2) (the square-root form, same event, via Pinsker);
      * rollout level, δ/2 = δ/4 per side: Hoeffding PAC-Bayes-λ over the n·K conditionally
        independent terms of width W (common random numbers make Ĵ a deterministic function
        of w given (x_i, U_ik)); rollout = ``hoeffding_lambda_bound(KL, nK, W, δ/4, lambdas)``.

    ``emp_prompt_mean`` = E_Q h̄_S (the exact-over-responses training mean, averaged over Q).
    If it is itself a Monte Carlo estimate with |error| ≤ ``mc_radius`` (e.g.
    ``mc_error_hoeffding`` at its own δ_MC, to be added to δ), the prompt term is taken at
    the worst q̂ in the interval: W·max(q_+ − kl⁻¹₋(q_−, c), kl⁻¹₊(q_+, c) − q_−) with
    q_± = clip(q̂ ± mc_radius/W, 0, 1). W must be valid for every w in Q's support and fixed
    before the prompts and rollouts (it may depend on the preference data); W = ∞ (τ = ∞
    with no finite log-ratio range) gives ∞ terms. For several priors (a σ₀ grid of size G)
    call with δ/G and take the minimum over the grid. Scalars broadcast elementwise.
    """
    emp, kl, n, K, lo, width, delta = map(_f64, (emp_prompt_mean, kl, n, K, lo, width, delta))
    # W = 0: no deviation; W = ∞: vacuous. Subnormal W counts as 0 (XLA on CPU flushes
    # subnormals in arithmetic but not always in comparisons).
    usable = (width >= jnp.finfo(_F64).tiny) & jnp.isfinite(width)
    safe_width = jnp.where(usable, width, 1.0)
    q_hat = jnp.clip((emp - jnp.where(usable, lo, emp)) / safe_width, 0.0, 1.0)
    radius = _f64(mc_radius) / safe_width
    q_minus, q_plus = jnp.clip(q_hat - radius, 0.0, 1.0), jnp.clip(q_hat + radius, 0.0, 1.0)
    c = _maurer_confidence(kl, n, delta / 2.0)
    deviation = jnp.maximum(q_plus - kl_inverse_lower(q_minus, c), kl_inverse_upper(q_plus, c) - q_minus)
    prompt = jnp.where(usable, width * deviation, jnp.where(jnp.isinf(width), jnp.inf, 0.0))
    prompt_sqrt = width * jnp.sqrt(c / 2.0)
    rollout = hoeffding_lambda_bound(kl, n * K, width, delta / 4.0, lambdas)
    prompt, prompt_sqrt, rollout = jnp.broadcast_arrays(prompt, prompt_sqrt, rollout)
    return B2Terms(prompt, prompt_sqrt, rollout, prompt + rollout, prompt_sqrt + rollout)


def mc_error_hoeffding(width, m, delta_mc) -> jax.Array:
    """Two-sided Hoeffding radius W·√(log(2/δ_MC)/(2m)) for a mean of m i.i.d. draws in a width-W interval.

    Bounds |(1/m)Σ_j f(w_j) − E_Q f| for w_j ∼ Q, e.g. E_Q terms of B2 under a Gaussian
    posterior. Its δ_MC adds to the bound's δ. Elementwise.
    """
    width, m, delta_mc = _f64(width), _f64(m), _f64(delta_mc)
    return width * jnp.sqrt(jnp.log(2.0 / delta_mc) / (2.0 * m))


# ---------------------------------------------------------------------------------------
# B7: certified reward-model error
# ---------------------------------------------------------------------------------------


def logistic_derivative(t) -> jax.Array:
    """σ'(t) = σ(t)(1 − σ(t)) = e^{−|t|}/(1 + e^{−|t|})², even and decreasing in |t|. Elementwise."""
    e = jnp.exp(-jnp.abs(_f64(t)))
    return e / (1.0 + e) ** 2


class RewardCertificate(NamedTuple):
    """B7's outputs: the confidence radius ‖θ̂ − θ*‖_V and the bound on L²_train."""

    radius: jax.Array
    l2_bound: jax.Array


def certified_reward_error(u, theta_hat, ridge_lambda, s_theta, feature_second_moment, delta,
                           grad_residual_norm=0.0) -> RewardCertificate:
    """B7 [E; Abbasi-Yadkori et al. 2011 Thm 1; Filippi et al. 2010]: w.p. ≥ 1 − δ over the labels,

    ‖θ̂ − θ*‖_V ≤ radius = (1/κ)[½√(2 log(1/δ) + log det(V/λ)) + √λ·S_θ + ‖r‖/√λ],
    L²_train = E_{D_train}⟨θ̂ − θ*, φ⟩² ≤ l2_bound = radius²·λ_max(V^{-1/2} M V^{-1/2}),

    V = Σ_j u_j u_jᵀ + λI, κ = σ'(max_j max(|⟨θ̂, u_j⟩|, S_θ‖u_j‖)), M = E_{D_train}[φφᵀ],
    r = ∇ of the *summed* loss Σ_j logloss_j + (λ/2)‖θ‖² at θ̂ (0 for the exact ridge MLE;
    pass the final Newton gradient norm otherwise). Assumes the Bradley–Terry model holds
    with a linear reward (σ_ξ = 0) and ‖θ*‖ ≤ S_θ; needs no bound on ‖u‖.
    Shapes: u ``[N, d]``, theta_hat ``[d]``, feature_second_moment ``[d, d]``; scalars else.
    """
    u, theta_hat, lam, s_theta, second_moment, delta = map(
        _f64, (u, theta_hat, ridge_lambda, s_theta, feature_second_moment, delta))
    d = theta_hat.shape[-1]
    gram = u.T @ u + lam * jnp.eye(d, dtype=_F64)
    chol = jnp.linalg.cholesky(gram)
    logdet_ratio = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))) - d * jnp.log(lam)
    worst_margin = jnp.max(jnp.maximum(jnp.abs(u @ theta_hat), s_theta * jnp.linalg.norm(u, axis=-1)))
    kappa = logistic_derivative(worst_margin)
    noise = 0.5 * jnp.sqrt(2.0 * jnp.log(1.0 / delta) + logdet_ratio)
    bias = jnp.sqrt(lam) * s_theta + _f64(grad_residual_norm) / jnp.sqrt(lam)
    radius = (noise + bias) / kappa
    # λ_max(V^{-1/2} M V^{-1/2}) = λ_max(L⁻¹ M L⁻ᵀ) for V = L Lᵀ (same spectrum as V⁻¹M).
    whitened = solve_triangular(chol, solve_triangular(chol, second_moment, lower=True).T, lower=True)
    top = jnp.linalg.eigvalsh(0.5 * (whitened + whitened.T))[-1]
    return RewardCertificate(radius, radius**2 * jnp.maximum(top, 0.0))


# ---------------------------------------------------------------------------------------
# B5: Lyapunov equations of the OU approximation
# ---------------------------------------------------------------------------------------


def lyapunov_continuous(H, C) -> jax.Array:
    """Solve HΣ + ΣH = C for symmetric H ≻ 0 (B5 with C = (η/b)C_g) [Mandt et al. 2017].

    H = U diag(λ) Uᵀ: Σ = U[(UᵀCU)_ij/(λ_i + λ_j)]Uᵀ. Shapes ``[d, d]`` → ``[d, d]``.
    H is read as symmetric (eigh); C need not be. If some λ_i + λ_j ≤ 0 there is no
    stationary law and the result is NaN.
    """
    H, C = _f64(H), _f64(C)
    eigval, eigvec = jnp.linalg.eigh(H)
    denom = eigval[:, None] + eigval[None, :]
    rotated = eigvec.T @ C @ eigvec
    solved = jnp.where(denom > 0, rotated / jnp.where(denom > 0, denom, 1.0), jnp.nan)
    return eigvec @ solved @ eigvec.T


def lyapunov_discrete(A, C) -> jax.Array:
    """Solve Σ = AΣAᵀ + C for symmetric A with spectral radius < 1 (B5: A = I − ηH, C = (η²/b)C_g).

    A = U diag(a) Uᵀ: Σ = U[(UᵀCU)_ij/(1 − a_i a_j)]Uᵀ. Shapes ``[d, d]`` → ``[d, d]``.
    Exact stationary covariance of the linearised SGD recursion. If some a_i a_j ≥ 1
    (η ≥ 2/λ_max(H): unstable) the result is NaN.
    """
    A, C = _f64(A), _f64(C)
    eigval, eigvec = jnp.linalg.eigh(A)
    denom = 1.0 - eigval[:, None] * eigval[None, :]
    rotated = eigvec.T @ C @ eigvec
    solved = jnp.where(denom > 0, rotated / jnp.where(denom > 0, denom, 1.0), jnp.nan)
    return eigvec @ solved @ eigvec.T


# ---------------------------------------------------------------------------------------
# Coverage: Clopper–Pearson intervals for a violation rate (THEORY.md §8.1)
# ---------------------------------------------------------------------------------------


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def clopper_pearson_upper(k, n, alpha=0.05) -> jax.Array:
    """One-sided (1 − α) upper confidence bound on a binomial rate from k successes in n trials.

    p_U = Beta⁻¹(1 − α; k + 1, n − k), i.e. the p solving P(Bin(n, p) ≤ k) = α, found by
    60-step bisection on I_p(k + 1, n − k) ≤ 1 − α (``jax.scipy.special.betainc``),
    returning the bracket's upper end. k = n → 1. Elementwise; k, n integer-valued.
    """
    k, n, alpha = jnp.broadcast_arrays(_f64(k), _f64(n), _f64(alpha))
    full = k >= n
    b = jnp.where(full, 1.0, n - k)
    _, hi = _bisect_unit_interval(lambda p: betainc(k + 1.0, b, p) <= 1.0 - alpha, k.shape)
    return jnp.where(full, 1.0, hi)


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def clopper_pearson_lower(k, n, alpha=0.05) -> jax.Array:
    """One-sided (1 − α) lower confidence bound: p_L = Beta⁻¹(α; k, n − k + 1).

    p_L solves P(Bin(n, p) ≥ k) = I_p(k, n − k + 1) = α; 60-step bisection returning the
    bracket's lower end. k = 0 → 0. Use it to refute a bound: p_L > δ. Elementwise.
    """
    k, n, alpha = jnp.broadcast_arrays(_f64(k), _f64(n), _f64(alpha))
    empty = k <= 0
    a = jnp.where(empty, 1.0, k)
    lo, _ = _bisect_unit_interval(lambda p: betainc(a, n - k + 1.0, p) < alpha, k.shape)
    return jnp.where(empty, 0.0, lo)


def clopper_pearson_interval(k, n, alpha=0.05):
    """Two-sided (1 − α) Clopper–Pearson interval: (lower at α/2, upper at α/2). Elementwise."""
    alpha = _f64(alpha)
    return clopper_pearson_lower(k, n, alpha / 2.0), clopper_pearson_upper(k, n, alpha / 2.0)
