"""SGD chains at the empirical maximiser against the Ornstein-Uhlenbeck prediction (B5, docs/theory.md §8.2–§8.5).

Per problem, on the problem's own training sample S (from :func:`rlhf_bounds.simulate.prepare`):

1. w_S = argmax F_S by Newton's method in float64 from w_ref + θ̂/β (the realizable optimum), the
   exact gradient (:func:`rlhf_bounds.learners.full_gradient`) and the autodiff Hessian
   (:func:`rlhf_bounds.ou.objective_hessian`); the best iterate is kept and ``chain_ws_converged``
   says whether ‖∇F_S(w_S)‖ ≤ ``grad_tol`` (:func:`refine_maximiser`);
2. H = −∇²F_S(w_S), C_g = Cov_i g_i(w_S) (exact: the minibatch element is a training prompt with its
   own rollout uniforms, so C_g over the n prompts is the covariance SGD samples from), the two
   predictions (:func:`rlhf_bounds.ou.ou_covariance_continuous`, ``_discrete``) and whether the problem
   is degenerate (C_g ≈ 0: :func:`is_degenerate`);
3. ``chains`` constant-step SGD chains of the learner's own ``step``
   (:func:`rlhf_bounds.learners.learner`, in its lane-major layout: each chain gathers its own
   prompts) on S, all started at w_S, each with its own minibatch index
   sequence (shared by the problems, as the engine shares the default kernel's), run for ``spec.steps``
   steps: a burn-in, then ``batches`` batches of L steps each. Nothing of size chains × T is kept: the
   scan carries each chain's running sums over the current batch and, across batches, the sums of the
   batch means and batch second moments (:class:`ChainMoments`);
4. from those sums (:func:`summarise_moments`): the empirical covariance, the integrated
   autocorrelation time along every coordinate and every eigenvector of H by batch means, the
   effective sample size, the covariance's sampling error, and the relative Frobenius errors against
   both predictions.

:class:`OUChainKernel` is the engine kernel (``rlhf_bounds.run(spec, problems, kernel=OUChainKernel())``);
with ``bounds=True`` it also evaluates the problem at w_S with the default kernel's finishing stage
(:func:`rlhf_bounds.simulate.finish`), which gives B2 with the Gaussian posterior Q = N(w_S, Σ_OU + s²I)
beside its actual E_Q gap (``b2_gauss_total``, ``gap_total_gauss``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import ou
from .learners import PolicyFit, TrainData, full_gradient, gather_rows, lane_rows, learner, training_tau
from .spec import Spec, SpecError

__all__ = ["Maximiser", "refine_maximiser", "OUSetup", "ou_setup", "ou_setups", "is_degenerate", "ChainMoments",
           "chain_schedule", "chain_indices", "run_chains", "accumulate_chains", "summarise_moments",
           "batch_means_iat", "ar1_iat", "ar1_batch_means_iat", "OUChainKernel", "KERNEL", "EXEMPT"]

F32, F64 = jnp.float32, jnp.float64


# ---- the maximiser ---------------------------------------------------------------------------

class Maximiser(NamedTuple):
    """w_S (float64 ``[d]``), ‖∇F_S(w_S)‖ and whether it is ≤ the tolerance."""

    w: jax.Array
    grad_norm: jax.Array
    converged: jax.Array


def refine_maximiser(spec: Spec, data: TrainData, w_ref, w0, steps: int = 12, grad_tol: float = 1e-6) -> Maximiser:
    """w_S = argmax F_S by ``steps`` Newton steps in float64 from ``w0`` (one problem; vmap it).

    Each step solves H δ = ∇F_S with H = −∇²F_S (autodiff); the iterate with the smallest exact
    gradient norm is kept (so a step that leaves the basin costs nothing). ``converged`` is
    ‖∇F_S(w_S)‖ ≤ ``grad_tol``.
    """
    beta, tau = spec.beta, training_tau(spec)
    d64 = TrainData(jnp.asarray(data.phi, F64), jnp.asarray(data.reward, F64), data.u)
    w_ref64 = jnp.asarray(w_ref, F64)
    grad = lambda w: full_gradient(w, w_ref64, d64, beta, tau)

    def newton(carry, _):
        w, best, best_g = carry
        g = grad(w)
        gn = jnp.linalg.norm(g)
        better = gn < best_g
        best, best_g = jnp.where(better, w, best), jnp.where(better, gn, best_g)
        h = ou.objective_hessian(spec, d64, w, w_ref64)
        step = jnp.linalg.solve(h, g)
        w_next = jnp.where(jnp.all(jnp.isfinite(step)), w + step, w)
        return (w_next, best, best_g), None

    w0 = jnp.asarray(w0, F64)
    (w, best, best_g), _ = jax.lax.scan(newton, (w0, w0, jnp.asarray(jnp.inf, F64)), None, length=steps)
    gn = jnp.linalg.norm(grad(w))
    best, best_g = jnp.where(gn < best_g, w, best), jnp.minimum(gn, best_g)
    return Maximiser(best, best_g, best_g <= grad_tol)


# ---- H, C_g and the predictions -------------------------------------------------------------

class OUSetup(NamedTuple):
    """One problem's OU pieces at w_S, float64."""

    max: Maximiser
    hessian: jax.Array        # H ``[d, d]``
    grad_cov: jax.Array       # C_g ``[d, d]``
    eigval: jax.Array         # H's eigenvalues, ascending ``[d]``
    eigvec: jax.Array         # H's eigenvectors (columns) ``[d, d]``
    sigma_cont: jax.Array     # HΣ + ΣH = (η/b)C_g
    sigma_disc: jax.Array     # Σ = (I − ηH)Σ(I − ηH) + (η²/b)C_g
    cont_ok: jax.Array
    disc_ok: jax.Array
    grad_scale: jax.Array     # mean_i ‖g_i(w_ref)‖²: the per-prompt gradient's size at the start
    degenerate: jax.Array


#: C_g is "≈ 0" when tr C_g ≤ this × mean_i ‖g_i(w_ref)‖² (docs/theory.md §8.5).
DEGENERATE_TOL = 1e-6


def is_degenerate(grad_cov, grad_scale, tol: float = DEGENERATE_TOL) -> jax.Array:
    """tr C_g ≤ tol · mean_i ‖g_i(w_ref)‖²: SGD's noise vanishes at w_S (realizable reward with exact
    expectations, or an RLOO baseline at the optimum), Σ ≈ 0 and a relative error is meaningless."""
    return jnp.trace(grad_cov) <= tol * grad_scale


def ou_setup(spec: Spec, data: TrainData, w_ref, w0, newton_steps: int = 12, grad_tol: float = 1e-6,
             degenerate_tol: float = DEGENERATE_TOL) -> OUSetup:
    """w_S, H, C_g (the spec's estimator), both predicted covariances, the degeneracy flag (one problem)."""
    m = refine_maximiser(spec, data, w_ref, w0, newton_steps, grad_tol)
    d64 = TrainData(jnp.asarray(data.phi, F64), jnp.asarray(data.reward, F64), data.u)
    w_ref64 = jnp.asarray(w_ref, F64)
    h = ou.objective_hessian(spec, d64, m.w, w_ref64)
    c_g = ou.gradient_covariance(spec, d64, m.w, w_ref64)
    eigval, eigvec = jnp.linalg.eigh(h)
    lr, b = jnp.asarray(spec.lr, F64), spec.batch
    cont = ou.ou_covariance_continuous(h, c_g, lr, b, symmetric=True)
    disc = ou.ou_covariance_discrete(h, c_g, lr, b, symmetric=True)
    g0 = ou.prompt_gradients(spec, d64, w_ref64, w_ref64)
    scale = jnp.mean(jnp.sum(jnp.square(g0), axis=-1))
    return OUSetup(m, h, c_g, eigval, eigvec, cont.sigma, disc.sigma, cont.ok, disc.ok, scale,
                   is_degenerate(c_g, scale, degenerate_tol))


def ou_setups(spec: Spec, data: TrainData, w_ref, w0, newton_steps: int = 12, grad_tol: float = 1e-6,
              degenerate_tol: float = DEGENERATE_TOL) -> OUSetup:
    """:func:`ou_setup` for P problems (leading axis P), one problem at a time even under ``vmap``.

    ``jax.custom_batching.sequential_vmap``: batched LAPACK calls (the Newton solves, ``eigh``) on
    XLA:CPU split a batch into tasks on the intra-op pool and block the calling pool thread, and two
    of them at once hung a 2-thread pool here (as docs/engine.md describes for the catalogue);
    unbatched calls run on the calling thread. The setup is a small part of a problem's work.
    """
    one = jax.custom_batching.sequential_vmap(
        lambda d, r, w: ou_setup(spec, d, r, w, newton_steps, grad_tol, degenerate_tol))
    return jax.vmap(one)(data, w_ref, w0)


# ---- the chains ------------------------------------------------------------------------------

def chain_schedule(steps: int, burn_fraction: float, batches: int) -> tuple[int, int]:
    """(burn-in, batch length L) for T = ``steps``: L = ⌊(1 − burn_fraction)·T / batches⌋ and the
    burn-in T − batches·L (≥ burn_fraction·T). :class:`SpecError` if L would be 0."""
    length = int((1.0 - burn_fraction) * steps) // batches
    if length < 1:
        raise SpecError(f"steps={steps} out of range: the OU chains need at least {batches} steps after a "
                        f"burn-in of {burn_fraction:g}·T (batches={batches}, burn_fraction={burn_fraction:g})")
    return steps - batches * length, length


def chain_indices(spec: Spec, chains: int, key: jax.Array) -> jax.Array:
    """The minibatch indices ``[T, b, chains]``: b prompts with replacement per step, one sequence per chain."""
    return jax.random.randint(key, (spec.steps, spec.batch, chains), 0, spec.prompts, dtype=jnp.int32)


class ChainMoments(NamedTuple):
    """Sums over chains c and batches j of one problem's batch statistics of x = w_t − w_S, float64:
    m_cj = (1/L)Σ_t x_t, M_cj = (1/L)Σ_t x_t x_tᵀ over batch j of chain c."""

    count: jax.Array   # number of batches summed (chains × batches)
    length: jax.Array  # L, steps per batch
    m: jax.Array       # Σ m_cj ``[d]``
    mm: jax.Array      # Σ m_cj m_cjᵀ ``[d, d]``
    M: jax.Array       # Σ M_cj ``[d, d]``
    MM: jax.Array      # Σ M_cj ∘ M_cj (elementwise) ``[d, d]``


def _moments_init(d: int, lanes_shape: tuple) -> tuple:
    z = lambda *s: jnp.zeros(s + lanes_shape[1:], F64)
    return (z(d), z(d, d), z(d, d), z(d, d))


def accumulate_chains(step, state, xs_burn, xs_batches, deviation, chains: int):
    """Run ``state = step(state, x)`` over ``xs_burn`` then over ``xs_batches`` (leading axes
    [batches, L]), accumulating the batch moments of ``deviation(state)`` ``[d, chains, Q]``.

    Generic over the chain (the OU kernel's SGD chains; an AR(1) process in the tests): returns
    (final state, :class:`ChainMoments` with a trailing axis Q). Per step it adds x and x xᵀ to
    the current batch's float32 sums; at a batch's end it adds that batch's m and M to the float64
    totals. Memory: O(d²·chains·Q), whatever T.
    """
    state, _ = jax.lax.scan(lambda s, x: (step(s, x), None), state, xs_burn)
    x0 = deviation(state)
    d, lanes = x0.shape[0], x0.shape[1:]
    length = jax.tree_util.tree_leaves(xs_batches)[0].shape[1]

    def one_step(carry, x_in):
        s, bx, bxx = carry
        s = step(s, x_in)
        x = deviation(s)
        return (s, bx + x, bxx + x[:, None] * x[None, :]), None

    def one_batch(carry, xs):
        s, tot = carry
        zeros = (jnp.zeros((d,) + lanes, F32), jnp.zeros((d, d) + lanes, F32))
        (s, bx, bxx), _ = jax.lax.scan(one_step, (s,) + zeros, xs)
        m = jnp.asarray(bx, F64) / length             # [d, chains, Q]
        M = jnp.asarray(bxx, F64) / length            # [d, d, chains, Q]
        sm, smm, sM, sMM = tot
        tot = (sm + jnp.sum(m, axis=1), smm + jnp.sum(m[:, None] * m[None, :], axis=2),
               sM + jnp.sum(M, axis=2), sMM + jnp.sum(M * M, axis=2))
        return (s, tot), None

    q_shape = lanes[1:]
    tot0 = (jnp.zeros((d,) + q_shape, F64), jnp.zeros((d, d) + q_shape, F64), jnp.zeros((d, d) + q_shape, F64),
            jnp.zeros((d, d) + q_shape, F64))
    (state, tot), _ = jax.lax.scan(one_batch, (state, tot0), xs_batches)
    batches = jax.tree_util.tree_leaves(xs_batches)[0].shape[0]
    count = jnp.full(q_shape, chains * batches, F64)
    return state, ChainMoments(count, jnp.full(q_shape, length, F64), *tot)


def run_chains(spec: Spec, data: TrainData, w_ref, w_s, indices, burn: int, batches: int) -> ChainMoments:
    """The SGD chains of Q problems (leading axis Q on ``data``, ``w_ref``, ``w_s``), all with the learner's step.

    ``indices`` ``[T, b, chains]`` (:func:`chain_indices`). The learner steps lane-major
    (``learner(spec, layout='lane_major')``): lane q·chains + c is chain c of problem q, whose
    minibatch at step t is prompts ``indices[t, :, c]`` of problem q's sample, gathered as whole
    rows of the samples' :func:`~rlhf_bounds.learners.lane_rows`
    (:func:`~rlhf_bounds.learners.gather_rows`). Returns :class:`ChainMoments` with a leading axis Q.
    """
    rows = lane_rows(data, w_ref)                      # [Q·n, A, d] ...
    Q, d = w_s.shape
    chains = indices.shape[-1]
    init, step = learner(spec, layout="lane_major")
    centre = jnp.asarray(w_s, F32)                     # [Q, d]
    lane_step = lambda s, idx_t: step(s, gather_rows(rows, idx_t, spec.prompts))
    # [d, chains, Q], the layout of accumulate_chains' sums (vectorised along chains and problems)
    deviation = lambda s: jnp.transpose(s.w.reshape(Q, chains, d) - centre[:, None, :], (2, 1, 0))
    w0 = jnp.broadcast_to(centre[:, None, :], (Q, chains, d)).reshape(Q * chains, d)
    length = (spec.steps - burn) // batches
    _, mom = accumulate_chains(lane_step, init(w0), indices[:burn],
                               indices[burn:].reshape((batches, length) + indices.shape[1:]), deviation, chains)
    return ChainMoments(*(jnp.moveaxis(x, -1, 0) for x in mom))


# ---- from the sums to the estimates ------------------------------------------------------------

def ar1_iat(a):
    """The integrated autocorrelation time 1 + 2Σ_{k≥1} a^k = (1 + a)/(1 − a) of an AR(1) process."""
    return (1.0 + a) / (1.0 - a)


def ar1_batch_means_iat(a, length):
    """What the batch-means estimator L·Var(batch mean)/Var(x) estimates for AR(1) with batches of L:
    τ − 2a(1 − a^L)/(L(1 − a)²), below τ = (1 + a)/(1 − a) by the correlation lost at batch edges."""
    a = jnp.asarray(a, F64)
    return ar1_iat(a) - 2.0 * a * (1.0 - a**length) / (length * (1.0 - a) ** 2)


def batch_means_iat(mom: ChainMoments, directions) -> jax.Array:
    """τ̂(u) = L·uᵀV_m u / uᵀΣ̂u for each column u of ``directions`` ``[d, k]`` (one problem), with V_m
    the covariance of the batch means and Σ̂ the pooled covariance; +inf where uᵀΣ̂u = 0."""
    n = mom.count
    mbar = mom.m / n
    sigma = mom.M / n - jnp.outer(mbar, mbar)
    v_m = (mom.mm / n - jnp.outer(mbar, mbar)) * n / (n - 1.0)
    num = jnp.einsum("ik,ij,jk->k", directions, v_m, directions)
    den = jnp.einsum("ik,ij,jk->k", directions, sigma, directions)
    return jnp.where(den > 0, mom.length * num / jnp.where(den > 0, den, 1.0), jnp.inf)


def _rel(x, ref):
    ref_norm = jnp.linalg.norm(ref)
    return jnp.where(ref_norm > 0, jnp.linalg.norm(x - ref) / jnp.where(ref_norm > 0, ref_norm, 1.0), jnp.inf)


def summarise_moments(spec: Spec, setup: OUSetup, mom: ChainMoments, burn: int) -> dict[str, jax.Array]:
    """One problem's chain columns (``chain_*``): see docs/engine.md's result columns for the OU kernel."""
    n = mom.count
    mbar = mom.m / n
    mean_M = mom.M / n
    sigma = mean_M - jnp.outer(mbar, mbar)
    samples = n * mom.length
    eta = jnp.asarray(spec.lr, F64)
    lam = setup.eigval
    iat_eig = batch_means_iat(mom, setup.eigvec)
    iat_coord = batch_means_iat(mom, jnp.eye(sigma.shape[0], dtype=F64))
    a = 1.0 - eta * lam
    iat_pred = ar1_iat(a)
    tau_max = jnp.max(jnp.concatenate([iat_eig, iat_coord]))
    ess = samples / jnp.maximum(tau_max, 1.0)
    fro = jnp.linalg.norm(sigma)
    safe = jnp.where(fro > 0, fro, 1.0)
    # Gaussian sampling error of a covariance from ESS independent draws: E‖S − Σ‖²_F = (‖Σ‖²_F + (tr Σ)²)/ESS.
    se_ess = jnp.where(fro > 0, jnp.sqrt((fro**2 + jnp.trace(sigma) ** 2) / ess) / safe, jnp.inf)
    var_M = (mom.MM / n - mean_M**2) * n / (n - 1.0)
    se_bm = jnp.where(fro > 0, jnp.sqrt(jnp.sum(jnp.maximum(var_M, 0.0)) / n) / safe, jnp.inf)
    rho = jnp.max(jnp.abs(a))
    return {
        "chain_ws_grad_norm": setup.max.grad_norm,
        "chain_ws_converged": setup.max.converged.astype(jnp.int32),
        "chain_degenerate": setup.degenerate.astype(jnp.int32),
        "chain_disc_ok": setup.disc_ok.astype(jnp.int32),
        "chain_cont_ok": setup.cont_ok.astype(jnp.int32),
        "chain_h_min_eig": lam[0],
        "chain_h_max_eig": lam[-1],
        "chain_cg_trace": jnp.trace(setup.grad_cov),
        "chain_cg_relative": jnp.trace(setup.grad_cov) / setup.grad_scale,
        "chain_sigma_trace": jnp.trace(sigma),
        "chain_sigma_cont_trace": jnp.trace(setup.sigma_cont),
        "chain_sigma_disc_trace": jnp.trace(setup.sigma_disc),
        "chain_rel_err_cont": _rel(sigma, setup.sigma_cont),
        "chain_rel_err_disc": _rel(sigma, setup.sigma_disc),
        "chain_cont_vs_disc": _rel(setup.sigma_cont, setup.sigma_disc),
        "chain_cov_se": se_ess,
        "chain_cov_se_bm": se_bm,
        "chain_ess": ess,
        "chain_samples": samples,
        "chain_iat_max": tau_max,
        "chain_iat_slow": iat_eig[0],
        "chain_iat_slow_pred": iat_pred[0],
        "chain_iat_slow_bm_pred": ar1_batch_means_iat(a[0], mom.length),
        "chain_inv_eta_lambda_min": 1.0 / (eta * lam[0]),
        "chain_batch_over_iat": mom.length / jnp.maximum(tau_max, 1.0),
        "chain_burn_bias": rho ** (2 * burn),
        "chain_mean_offset": jnp.where(jnp.trace(sigma) > 0,
                                       jnp.linalg.norm(mbar) / jnp.sqrt(jnp.where(jnp.trace(sigma) > 0,
                                                                                  jnp.trace(sigma), 1.0)), jnp.inf),
        "chain_iat_eig": iat_eig,
        "chain_iat_eig_pred": iat_pred,
        "chain_iat_coord": iat_coord,
        "chain_sigma": sigma,
        "chain_sigma_disc": setup.sigma_disc,
        "chain_sigma_cont": setup.sigma_cont,
        "chain_w_s": setup.max.w,
    }


#: Chain columns that may legitimately be +inf (a relative error or IAT where a covariance is 0:
#: the degenerate corner). They must still not be NaN; every other column must be finite.
EXEMPT = ("chain_rel_err_cont", "chain_rel_err_disc", "chain_cont_vs_disc", "chain_cov_se", "chain_cov_se_bm",
          "chain_iat", "chain_ess", "chain_batch_over_iat", "chain_mean_offset", "chain_inv_eta_lambda_min")


def _must_be_finite(name: str) -> bool:
    from .status import must_be_finite
    return must_be_finite(name) and not name.startswith(EXEMPT)


# ---- the engine kernel -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OUChainKernel:
    """The OU chains as an engine kernel (see the module docstring).

    ``chains`` SGD chains per problem; the first ``burn_fraction`` of ``spec.steps`` is burn-in
    (docs/theory.md §8.2: the covariance's relative bias after B steps from w_S is at most
    ρ(I − ηH)^{2B}, reported as ``chain_burn_bias``), the rest ``batches`` batches for the batch
    means. ``problem_block`` problems run side by side in one compiled chain loop (chains ×
    problem_block lanes; a fixed width, so a problem's result does not depend on its chunk).
    ``bounds=True`` adds the default kernel's finishing stage at w_S (population values, gap terms
    and the bound catalogue, among them B2 with Q = N(w_S, Σ_OU + s²I)).
    """

    chains: int = 64
    burn_fraction: float = 0.2
    batches: int = 8
    newton_steps: int = 12
    grad_tol: float = 1e-6
    problem_block: int = 8
    bounds: bool = True
    finish_block: int | None | str = "auto"

    def __post_init__(self):
        for name in ("chains", "batches", "newton_steps", "problem_block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{name}={v!r} out of range: must be a whole number ≥ 1")
        if not 0.0 <= self.burn_fraction < 1.0:
            raise SpecError(f"burn_fraction={self.burn_fraction!r} out of range: must be in [0, 1)")
        if self.batches < 2:
            raise SpecError(f"batches={self.batches} out of range: batch means need at least 2 batches")

    @property
    def name(self) -> str:
        return (f"ou-chains(chains={self.chains},burn={self.burn_fraction:g},batches={self.batches},"
                f"newton={self.newton_steps},tol={self.grad_tol:g},block={self.problem_block},"
                f"bounds={int(self.bounds)},finish={self.finish_block})")

    def work_units(self, spec: Spec) -> float:
        """One problem's work in the units of :func:`rlhf_bounds.suites.estimate_seconds`: the chains' steps
        (chains × T × b prompts × A × d), Newton at w_S, and the default finishing stage with ``bounds``."""
        from .learners import batch_size
        from .suites._framework import work_units

        per_prompt = spec.actions * spec.d
        chains = self.chains * spec.steps * batch_size(spec) * per_prompt
        newton = self.newton_steps * spec.prompts * per_prompt * spec.d
        return chains + newton + (work_units(spec) if self.bounds else 0.0)

    def check(self, spec: Spec) -> tuple[int, int]:
        """(burn-in, batch length) for this spec; :class:`SpecError` for a spec the chains do not model."""
        if spec.learner != "SGD" or spec.schedule != "constant":
            raise SpecError(f"learner={spec.learner!r} (schedule={spec.schedule!r}) is not allowed: the OU chains "
                            "need learner='SGD' with schedule='constant'")
        if self.bounds and spec.steps % spec.record_every:
            raise SpecError(f"record_every={spec.record_every} out of range: must divide steps={spec.steps}")
        return chain_schedule(spec.steps, self.burn_fraction, self.batches)

    def compiler_options(self, backend: str) -> dict[str, str]:
        """XLA options for the engine's compilation (:func:`rlhf_bounds.engine.kernel_compiler_options`).

        On CPU, XLA's YNNPACK fusions are turned off for this kernel: in the chains' lane-major
        layout the softmax's sums over the A responses run along the minor axis, which YNNPACK's
        reductions run several times slower than XLA's own loops (benchmarks/README.md, W2).
        """
        return {"xla_cpu_experimental_ynn_fusion_type": ""} if backend == "cpu" else {}

    def _finish_block(self):
        from .simulate import default_finish_block
        return default_finish_block() if self.finish_block == "auto" else self.finish_block

    def __call__(self, spec: Spec, keys: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
        from .simulate import finish, prepare
        from .status import status_code

        burn, _ = self.check(spec)
        fb = self._finish_block() if self.bounds else None
        block = math.lcm(self.problem_block, fb or 1)
        P = keys.shape[0]
        pad = -P % block
        if pad:
            keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (pad,) + keys.shape[1:])])
        prep = jax.vmap(lambda k: prepare(spec, k))(keys)
        w0 = prep.world.w_ref + prep.theta_hat / spec.beta
        setup = ou_setups(spec, prep.data, prep.world.w_ref, w0, self.newton_steps, self.grad_tol)
        idx = chain_indices(spec, self.chains, shared_key)
        Q = self.problem_block
        split = lambda x: x.reshape((-1, Q) + x.shape[1:])
        per_block = lambda args: run_chains(spec, args[0], args[1], args[2], idx, burn, self.batches)
        mom = jax.lax.map(per_block, jax.tree_util.tree_map(split, (prep.data, prep.world.w_ref, setup.max.w)))
        mom = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), mom)
        out = jax.vmap(lambda s, m: summarise_moments(spec, s, m, burn))(setup, mom)
        if self.bounds:
            w_s = setup.max.w.astype(F32)
            g = jnp.zeros(w_s.shape[:1], F32)
            fit = PolicyFit(w_s, w_s, g, g, jnp.repeat(w_s[:, None], spec.steps // spec.record_every, axis=1),
                            jnp.zeros((w_s.shape[0], spec.steps // spec.record_every), F32))
            done = jax.lax.map(lambda args: finish(spec, *args), (prep, fit), batch_size=fb)
            done.pop("status")
            out = {**done, **out}
        out["status"] = jax.vmap(lambda o: status_code(spec, o, _must_be_finite))(out)
        return {k: v[:P] for k, v in out.items()} if pad else out


#: The kernel of the ``ou`` suite.
KERNEL = OUChainKernel()
