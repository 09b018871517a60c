"""Float64 numerics shared by the bounds: casts, the fixed-step bisection and the radix select.

``_f64`` casts to float64 and ``_f64_exact`` widens float32 exactly (subnormals included);
``_bisect_unit_interval`` is the fixed-length bisection on [0, 1] behind every inversion;
``tail_threshold`` is the exact weighted tail quantile, an MSD radix select on the
order-preserving integer keys of the atoms (no sort).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


#: Bisection steps of every inversion on [0, 1]. The bracket halves each step, so
#: after 60 steps it is at most 2^-60 ≈ 8.7e-19 wide in exact arithmetic; in float64
#: it stops shrinking at one ulp of the answer (≤ 1.1e-16), which is the real resolution.
BISECTION_ITERATIONS = 60

_F64 = jnp.float64


def _f64(x) -> jax.Array:
    return jnp.asarray(x, _F64)


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
