"""B6: the stability results of [A] (Li et al. 2026), made checkable (docs/theory.md §17).

[A] works with λ = 1: policy π_θ ∝ exp⟨θ, φ⟩, reward ⟨θ*, φ⟩, objective f_θ(x) = E_π r − KL. The
engine's objective with KL weight β is f_w(x; r, β) = β·f^A_w(x; r/β), the same policy parameter
w = θ, so [A]'s results apply with the reward θ*/β: D_A = D/β, R = 3·D_A (the ball ‖w‖ ≤ R that [A]
works in), values and gradients of f multiplied by β, Hessians by β. Every bound below is written in
the engine's units (what the engine reports), with the mapping done once in :func:`paper_radius`.

Per problem this module computes

* the assumption diagnostics: σ of Assumption 3 (λ_min of the evaluation-set mean of V_x(w), at the
  population optimum and at the points the learners visit), Assumption 4 (A ≤ d and each prompt's
  features linearly independent: the smallest Gram-Schmidt pivot), ε_n of Assumption 5 (the largest
  norm of the projection of φ onto the null space of V_S(θ*_S) over the evaluation set) and the
  spectral quantities of Γ₁;
* the paper's bounds: Lemma 1, Theorem 1's sample-size threshold, Theorem 2's stability bound,
  Lemma 2's gradient bound with the certified smoothness constant :func:`smoothness_bound`;
* empirical uniform stability by replace-one retraining (:func:`replace_one`,
  :func:`replace_one_fits`): S and the R samples S^(r) with prompt j_r replaced trained side by
  side on the learner's lane axis with the same randomness (the learner's own ``init``/``step``),
  and the largest change of f over the evaluation set (:func:`empirical_stability`).

:class:`StabilityKernel` is the engine kernel that does all of it for P problems at once.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import learners as L
from .policy import feature_covariance, log_probs, objective
from .simulate import prepare
from .spec import Spec, SpecError
from .status import status_code
from .world import draw_prompts, true_reward

__all__ = ["NULL_TOL", "paper_radius", "smoothness_bound", "objective_hessian", "mean_covariance", "mean_hessian", "eigvalsh",
           "assumption3_sigma", "gram_schmidt_pivot", "assumption4_pivot", "coverage_diagnostics",
           "CoverageDiagnostics", "gamma1", "lemma1_bound", "theorem1_threshold", "theorem2_stability_bound",
           "theorem2_generalisation_shape", "lemma2_bound", "replaced_indices", "replace_one", "replace_one_fits",
           "empirical_stability", "learner_specs", "StabilityKernel", "check_spec"]

F32 = jnp.float32
F64 = jnp.float64

#: Relative eigenvalue tolerance: an eigenvalue of V at most NULL_TOL·λ_max is 0 (null space), and
#: Assumption 3 is met when σ > NULL_TOL·C² (float32 features leave about 1e-7 of λ_max in a null direction).
NULL_TOL = 1e-4


# ---- the β mapping ---------------------------------------------------------------------------

def paper_radius(reward_norm, beta):
    """R = 3·D/β: [A]'s ball radius (R = 3D at λ = 1) for the reward θ*/β that the KL weight β maps to."""
    return 3.0 * reward_norm / beta


def smoothness_bound(*, reward_norm, feature_bound, beta, sigma_xi=0.0):
    """Certified smoothness L_F of F_S(w) = (1/n)Σ_i f_w(x_i; r, β) on the ball ‖w − w_ref‖ ≤ R = 3D/β (engine units):

        L_F = C²·(8·D·C + 2·σ_ξ + β)

    From ∇²f_w(x) = E_π[c cᵀ (h − h̄)] − β V_x(w) with c = φ − E_πφ and h = r − βℓ (:func:`objective_hessian`),
    ‖V_x‖ ≤ E_π‖c‖² ≤ C² and |h_a − h̄| ≤ range(h) ≤ range(r) + β·range(ℓ) ≤ (2DC + 2σ_ξ) + 2βC·R
    (docs/theory.md §17). [A]'s L_f (λ = 1, reward θ*/β) is L_F/β; GA with [A]'s η = 1/L_f is the engine's GA
    with η = 1/L_F.
    """
    C = feature_bound
    return C * C * (8.0 * reward_norm * C + 2.0 * sigma_xi + beta)


# ---- one prompt and one set of prompts --------------------------------------------------------

def objective_hessian(w, w_ref, phi, reward, beta):
    """∇²_w f_w(x; r, β) = Σ_a π_a c_a c_aᵀ (h_a − h̄) − β V_x(w) for one prompt (exact KL), ``[d, d]``.

    c_a = φ_a − E_πφ, h = r − βℓ_w (the response objective at τ = ∞), h̄ = E_π h. From ∇f = E_π[c (h − h̄)]
    (the exact gradient) and ∂π_a = π_a c_a, ∂c_a = −V, ∂h_a = −β c_a. The tests check it against autodiff.
    """
    lp = log_probs(w, phi)
    p = jnp.exp(lp)
    h = reward - beta * (lp - log_probs(w_ref, phi))
    c = phi - p @ phi
    wgt = p * (h - jnp.sum(p * h))
    return (c * wgt[:, None]).T @ c - beta * feature_covariance(w, phi)


def _centred(w, phi):
    """π_w ``[m, A]`` and c = φ − E_πφ ``[m, A, d]`` for prompts ``phi`` ``[m, A, d]``."""
    p = jax.nn.softmax(phi @ w, axis=-1)
    return p, phi - jnp.einsum("ma,mad->md", p, phi)[:, None, :]


def mean_covariance(w, phi):
    """(1/m) Σ_x V_x(w) over prompts ``phi`` ``[m, A, d]``: E_x V_x(w) on a set (V_S on the training sample).

    One contraction over (x, a) of π_a c_a c_aᵀ (the per-prompt :func:`rlhf_bounds.policy.feature_covariance`
    summed; d × d products per prompt vectorise badly on CPU)."""
    p, c = _centred(w, phi)
    return jnp.einsum("ma,mai,maj->ij", p, c, c) / phi.shape[0]


def mean_hessian(w, w_ref, phi, reward, beta):
    """∇²F_S(w) = (1/m) Σ_x :func:`objective_hessian` over prompts ``phi`` ``[m, A, d]``, ``reward`` ``[m, A]``."""
    p, c = _centred(w, phi)
    lp = jax.nn.log_softmax(phi @ w, axis=-1)
    lp_ref = jax.nn.log_softmax(phi @ w_ref, axis=-1)
    h = reward - beta * (lp - lp_ref)
    wgt = p * (h - jnp.sum(p * h, axis=-1, keepdims=True) - beta)
    return jnp.einsum("ma,mai,maj->ij", wgt, c, c) / phi.shape[0]


def eigvalsh(x):
    """Eigenvalues and eigenvectors of symmetric ``x`` ``[d, d]`` in float64, one matrix at a time even under
    ``vmap`` (batched LAPACK on a 2-thread CPU pool can deadlock, docs/engine.md)."""
    return jax.custom_batching.sequential_vmap(lambda m: jnp.linalg.eigh(m.astype(F64)))(x)


def assumption3_sigma(w, phi):
    """σ(w) = λ_min((1/m) Σ_x V_x(w)) on prompts ``phi`` ``[m, A, d]``: Assumption 3 asks σ(w) ≥ σ > 0 for all w."""
    return eigvalsh(mean_covariance(w, phi))[0][0]


def gram_schmidt_pivot(phi_x):
    """The smallest pivot ‖φ_a − proj_{span(φ_1..φ_{a−1})} φ_a‖ of modified Gram-Schmidt on the rows of
    ``phi_x`` ``[A, d]``: 0 exactly when the A features are linearly dependent (always when A > d); 1 for
    orthonormal rows. (It bounds the smallest singular value from above.)"""
    A, d = phi_x.shape
    scale = jnp.max(jnp.linalg.norm(phi_x, axis=-1))
    q = jnp.zeros((A, d), phi_x.dtype)
    pivots = []
    for a in range(A):
        v = phi_x[a]
        for b in range(a):
            v = v - (q[b] @ v) * q[b]
        r = jnp.linalg.norm(v)
        keep = r > 1e-5 * jnp.maximum(scale, 1e-30)
        q = q.at[a].set(jnp.where(keep, v / jnp.maximum(r, 1e-30), 0.0))
        pivots.append(jnp.where(keep, r, 0.0))
    return jnp.min(jnp.stack(pivots))


def assumption4_pivot(phi):
    """Assumption 4's linear independence over prompts ``phi`` ``[m, A, d]``: the smallest Gram-Schmidt pivot."""
    return jnp.min(jax.vmap(gram_schmidt_pivot)(phi))


class CoverageDiagnostics(NamedTuple):
    """Assumption 5 and the spectrum of V_S(θ*_S): ε_n, σ_max, σ⁺_min (the smallest eigenvalue above the null tolerance)."""

    eps: jax.Array
    sigma_max: jax.Array
    sigma_min_plus: jax.Array


def coverage_diagnostics(v_s, phi_eval, tol: float = NULL_TOL) -> CoverageDiagnostics:
    """ε_n = max over evaluation prompts and responses of ‖P_null φ(x, a)‖, P_null the projector onto the
    eigenvectors of ``v_s`` (V_S(θ*_S), ``[d, d]``) with eigenvalue ≤ tol·λ_max; and σ_max, σ⁺_min of ``v_s``.

    The smallest remainder r_S of Assumption 5's φ = V_S b + r_S is the projection onto the null space."""
    lam, u = eigvalsh(v_s)
    top = jnp.maximum(lam[-1], 0.0)
    null = lam <= tol * top
    coef = jnp.einsum("mad,dk->mak", phi_eval.astype(F64), u)
    eps = jnp.sqrt(jnp.max(jnp.sum(jnp.where(null, coef * coef, 0.0), axis=-1)))
    sigma_min_plus = jnp.min(jnp.where(null, jnp.inf, lam))
    return CoverageDiagnostics(eps, top, sigma_min_plus)


# ---- the paper's bounds (engine units, float64) -----------------------------------------------

def _f64(*xs):
    return tuple(jnp.asarray(x, F64) for x in xs)


def gamma1(n, eps, eps_other, sigma_max, sigma_min_plus, sigma_min_plus_other, *, reward_norm, feature_bound, beta):
    """Γ₁ of [A] Thm 2 for one pair (S, S'): 4nRε_n + 8RC³ σ_max(V_S)/(σ⁺_min(V_S)·σ⁺_min(V_S')), with
    ε_n = max(ε(S), ε(S')) and R = 3D/β. The sup over all (S, S') is estimated by the max over the pairs tried."""
    n, eps, eps_o, smax, smin, smin_o, D, C, beta = _f64(n, eps, eps_other, sigma_max, sigma_min_plus,
                                                          sigma_min_plus_other, reward_norm, feature_bound, beta)
    R = paper_radius(D, beta)
    return 4.0 * n * R * jnp.maximum(eps, eps_o) + 8.0 * R * C**3 * smax / (smin * smin_o)


def lemma1_bound(n, *, reward_norm, feature_bound, delta):
    """[A] Lemma 1 in engine units: β·3RC√(2 log(2/ρ)/n) with R = 3D/β, i.e. 9·D·C·√(2 log(2/ρ)/n) (ρ = δ)."""
    n, D, C, rho = _f64(n, reward_norm, feature_bound, delta)
    return 9.0 * D * C * jnp.sqrt(2.0 * jnp.log(2.0 / rho) / n)


def theorem1_threshold(sigma, d, *, reward_norm, feature_bound, beta, delta):
    """[A] Thm 1: θ* is the unique empirical stationary point in ‖θ‖ ≤ R w.p. ≥ 1 − ρ once
    n > (128C⁴/σ²)(log(1/ρ) + d·log(432·R·C⁵/σ²)), R = 3D/β; +∞ when σ ≤ 0 (Assumption 3 fails)."""
    sigma, d, D, C, beta, rho = _f64(sigma, d, reward_norm, feature_bound, beta, delta)
    R = paper_radius(D, beta)
    s2 = jnp.where(sigma > 0, sigma * sigma, jnp.nan)
    value = (128.0 * C**4 / s2) * (jnp.log(1.0 / rho) + d * jnp.log(432.0 * R * C**5 / s2))
    return jnp.where(sigma > 0, value, jnp.inf)


def theorem2_stability_bound(n, gamma, *, reward_norm, feature_bound, beta):
    """[A] Thm 2 in engine units: β·(Γ₁/n + 2RC√(Γ₁/n)), R = 3D/β (+∞ when Γ₁ is)."""
    n, gamma, D, C, beta = _f64(n, gamma, reward_norm, feature_bound, beta)
    R = paper_radius(D, beta)
    return beta * (gamma / n + 2.0 * R * C * jnp.sqrt(gamma / n))


def theorem2_generalisation_shape(n, stability, *, reward_norm, feature_bound, beta, delta):
    """The shape of [A] Thm 2's generalisation result (a ≲, constant unstated), engine units:
    ℰ_stab·log n·log(1/ρ) + β·6RC√(log(1/ρ)/n), with ℰ_stab in engine units and R = 3D/β."""
    n, e, D, C, beta, rho = _f64(n, stability, reward_norm, feature_bound, beta, delta)
    R = paper_radius(D, beta)
    return e * jnp.log(n) * jnp.log(1.0 / rho) + beta * 6.0 * R * C * jnp.sqrt(jnp.log(1.0 / rho) / n)


def lemma2_bound(steps, lipschitz, *, reward_norm, feature_bound):
    """[A] Lemma 2 in engine units: GA with η = 1/L_F has min_{t≤T} ‖∇F_S(w_t)‖² ≤ 36·L_F·D·C/T
    ([A]'s 12·L_f·R·C/T with L_f = L_F/β, R = 3D/β, and gradients β times [A]'s)."""
    T, Lf, D, C = _f64(steps, lipschitz, reward_norm, feature_bound)
    return 36.0 * Lf * D * C / T


# ---- replace-one retraining -------------------------------------------------------------------

def replaced_indices(spec: Spec, key: jax.Array, replacements: int) -> jax.Array:
    """The training prompts j_1..j_R (distinct) that the replace-one samples S^(r) replace, ``[R]`` int32:
    drawn from one key shared by all problems (their prompts are i.i.d., as for the minibatch indices)."""
    if not 1 <= replacements <= spec.prompts:
        raise SpecError(f"replacements={replacements} out of range: must be in [1, prompts={spec.prompts}]")
    return jax.random.choice(key, spec.prompts, (replacements,), replace=False).astype(jnp.int32)


def replace_one(data: L.TrainData, new: L.TrainData, idx: jax.Array) -> L.TrainData:
    """S and its R neighbours for one problem: ``data`` (n prompts), ``new`` (R prompts), ``idx`` ``[R]`` →
    a TrainData with a leading axis 1 + R: variant 0 is S, variant r is S with prompt idx[r−1] set to new[r−1]."""
    R = idx.shape[0]
    rows = jnp.arange(1, R + 1)

    def one(x, y):
        stacked = jnp.broadcast_to(x[None], (R + 1,) + x.shape)
        return stacked.at[rows, idx].set(y)

    return L.TrainData(*(one(x, y) for x, y in zip(data, new)))


def replace_one_fits(spec: Spec, data: L.TrainData, new: L.TrainData, idx: jax.Array, w_ref: jax.Array,
                     indices: jax.Array) -> L.PolicyFit:
    """The spec's learner on S and every S^(r), for P problems: ``data`` ``[P, n, ...]``, ``new`` ``[P, R, ...]``,
    ``idx`` ``[R]``, ``w_ref`` ``[P, d]``, ``indices`` the minibatch indices (shared by all lanes: the same
    randomness for S and S'). The P·(1 + R) samples are lanes of one :func:`rlhf_bounds.learners.train_policies`
    call (problem-last, in lane blocks); every output has leading axes ``[P, 1 + R]``."""
    both = jax.vmap(replace_one, in_axes=(0, 0, None))(data, new, idx)
    P, V = both.phi.shape[:2]
    lanes = jax.tree_util.tree_map(lambda x: x.reshape((P * V,) + x.shape[2:]), both)
    w_lanes = jnp.repeat(w_ref, V, axis=0)
    fit = L.train_policies(spec, lanes, w_lanes, indices)
    return jax.tree_util.tree_map(lambda x: x.reshape((P, V) + x.shape[1:]), fit)


def empirical_stability(f_s: jax.Array, f_replaced: jax.Array) -> jax.Array:
    """max_r max_x |f_{w_S}(x) − f_{w_{S^(r)}}(x)|: ``f_s`` ``[M]`` on the evaluation set, ``f_replaced`` ``[R, M]``."""
    return jnp.max(jnp.abs(f_replaced - f_s[None]))


# ---- the learners of the study -----------------------------------------------------------------

def _variant(spec: Spec, **changes) -> Spec:
    """``spec`` with fields changed, without validation: traced fields may hold tracers inside the kernel."""
    out = object.__new__(Spec)
    for f in dataclasses.fields(Spec):
        object.__setattr__(out, f.name, changes.get(f.name, getattr(spec, f.name)))
    return out


def check_spec(spec: Spec) -> None:
    """The stability study runs in [A]'s setting: the oracle reward and the exact KL in training."""
    if spec.reward_model != "oracle":
        raise SpecError(f"reward_model={spec.reward_model!r} out of range: the stability kernel needs 'oracle' "
                        "([A]'s setting: the learner sees r*)")
    if spec.train_log_ratio != "exact":
        raise SpecError(f"train_log_ratio={spec.train_log_ratio!r} out of range: the stability kernel needs "
                        "'exact' ([A]'s objective has the exact KL)")


def learner_specs(spec: Spec, kernel: "StabilityKernel") -> dict[str, Spec]:
    """The three learners of the study, as specs for :func:`rlhf_bounds.learners.learner`:

    * ``opt``: GA to the empirical optimum θ*_S (``kernel.opt_steps`` steps of η = opt_step/(βC²));
    * ``ga``: [A]'s GA, η = 1/L_F (:func:`smoothness_bound`), ``spec.steps`` steps recorded every ``record_every``;
    * ``sga``: [A]'s SGA, one prompt per step, exact over responses, η_t = 1/(2 L_F √t),
      ``kernel.sga_factor``·T steps, the same number of checkpoints.
    """
    lf = smoothness_bound(reward_norm=spec.reward_norm, feature_bound=spec.feature_bound, beta=spec.beta,
                          sigma_xi=spec.sigma_xi)
    C = spec.feature_bound
    return {
        "opt": _variant(spec, learner="GA", lr=kernel.opt_step / (spec.beta * C * C), steps=kernel.opt_steps,
                        record_every=kernel.opt_steps),
        "ga": _variant(spec, learner="GA", lr=1.0 / lf),
        "sga": _variant(spec, learner="SGA", estimator="exact", lr=0.5 / lf, steps=kernel.sga_factor * spec.steps,
                        record_every=kernel.sga_factor * spec.record_every),
    }


def _population_optimum(spec: Spec, kernel: "StabilityKernel", phi, reward, w0, w_ref):
    """GA on the evaluation sets from w0 (θ*/β): the population optimum w* of J for B problems (``phi``
    ``[B, M, A, d]``, ``reward`` ``[B, M, A]``, ``w0``, ``w_ref`` ``[B, d]``) → (w* ``[B, d]``, ‖∇J(w*)‖ ``[B]``).
    The learner's own ``init``/``step`` on the problem-last evaluation sets (the same step as training)."""
    pspec = _variant(learner_specs(spec, kernel)["opt"], prompts=phi.shape[1], steps=kernel.pop_steps)
    init, step = L.learner(pspec)
    full = L.problem_last(L.TrainData(phi, reward, jnp.zeros(phi.shape[:2] + (1,), F32)), w_ref)
    state, _ = jax.lax.scan(lambda s, _: (step(s, full), None), init(w0.T), None, length=kernel.pop_steps)
    g = L.gradient(state.w, full, spec.beta, jnp.inf, "exact")
    return state.w.T, jnp.linalg.norm(g, axis=0)


def _best_so_far(traj_g):
    """Index of the best-gradient iterate among checkpoints 0..j, for every j (``traj_g`` ``[J]``)."""
    J = traj_g.shape[0]
    mask = jnp.arange(J)[None, :] <= jnp.arange(J)[:, None]
    return jnp.argmin(jnp.where(mask, traj_g[None, :], jnp.inf), axis=1)


@dataclasses.dataclass(frozen=True)
class StabilityKernel:
    """The stability study's engine kernel: replace-one retraining and [A]'s diagnostics and bounds.

    ``replacements`` R prompts replaced (S → S^(r)); ``opt_steps`` GA steps of size ``opt_step``/(βC²) to the
    empirical optimum; ``pop_steps`` GA steps on the evaluation set from θ*/β to the population optimum;
    ``sga_factor`` SGA's T as a multiple of the spec's; ``diag_prompts`` evaluation prompts the d × d
    diagnostics average over; ``finish_block`` problems evaluated at once (fixed, so that a problem's result
    does not depend on its chunk). The spec's ``steps``/``record_every`` are GA's T and checkpoint spacing.
    """

    replacements: int = 8
    opt_steps: int = 400
    opt_step: float = 2.0
    pop_steps: int = 100
    sga_factor: int = 4
    diag_prompts: int = 2048
    finish_block: int = 16

    @property
    def name(self) -> str:
        return (f"stability-R{self.replacements}-opt{self.opt_steps}x{self.opt_step:g}-pop{self.pop_steps}"
                f"-sga{self.sga_factor}-diag{self.diag_prompts}-fb{self.finish_block}")

    def work_units(self, spec: Spec) -> float:
        """One problem's work in the units of :func:`rlhf_bounds.suites.estimate_seconds`: S and its R
        replacements trained by the three learners (GA to θ*_S, [A]'s GA, [A]'s SGA: one prompt a step),
        the population optimum on the evaluation set, and the d × d diagnostics."""
        per_prompt = spec.actions * spec.d
        lanes = 1 + min(self.replacements, spec.prompts)
        train = lanes * ((self.opt_steps + spec.steps) * spec.prompts + spec.steps * self.sga_factor) * per_prompt
        return (train + self.pop_steps * spec.eval_prompts * per_prompt
                + self.diag_prompts * per_prompt * spec.d + 3 * spec.eval_prompts * per_prompt)

    def __call__(self, spec: Spec, keys: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
        check_spec(spec)
        P = keys.shape[0]
        pad = -P % self.finish_block
        if pad:
            keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (pad,) + keys.shape[1:])])
        R = min(self.replacements, spec.prompts)
        k_idx, _ = jax.random.split(jax.random.fold_in(shared_key, 7))
        idx = replaced_indices(spec, k_idx, R)
        prep = jax.vmap(lambda k: prepare(spec, k))(keys)

        def new_prompts(world, key):
            k_p, k_u = jax.random.split(jax.random.fold_in(key, 1))
            pr = draw_prompts(spec, world, k_p, R)
            return L.TrainData(pr.phi, true_reward(spec, world, pr), jax.random.uniform(k_u, (R, spec.rollouts), F32))

        new = jax.vmap(new_prompts)(prep.world, prep.keys.fresh)
        specs = learner_specs(spec, self)
        fits = {}
        for name, s in specs.items():
            indices = L.minibatch_indices(s, shared_key) if s.learner != "GA" else jnp.zeros((s.steps, 1), jnp.int32)
            fits[name] = replace_one_fits(s, prep.data, new, idx, prep.world.w_ref, indices)
        B = self.finish_block
        blocked = jax.tree_util.tree_map(lambda x: x.reshape((x.shape[0] // B, B) + x.shape[1:]), (prep, new, fits))
        out = jax.lax.map(lambda args: self._finish_block(spec, idx, *args), blocked)
        out = {k: v.reshape((-1,) + v.shape[2:]) for k, v in out.items()}
        return {k: v[:P] for k, v in out.items()} if pad else out

    def _finish_block(self, spec: Spec, idx, prep, new, fits) -> dict[str, jax.Array]:
        """One block of ``finish_block`` problems: their evaluation sets, the population optima (GA, problem-last),
        then :meth:`_finish` for each problem."""
        ev = jax.vmap(lambda w, k: draw_prompts(spec, w, k, spec.eval_prompts))(prep.world, prep.keys.eval)
        r_ev = jax.vmap(lambda w, e: true_reward(spec, w, e))(prep.world, ev)
        w_pop, pop_grad = _population_optimum(spec, self, ev.phi, r_ev, prep.world.theta_star / spec.beta,
                                              prep.world.w_ref)
        return jax.vmap(lambda *a: self._finish(spec, idx, *a))(prep, new, fits, ev.phi, r_ev, w_pop, pop_grad)

    # ---- one problem after training ----------------------------------------------------------
    def _finish(self, spec: Spec, idx, prep, new, fits, ev_phi, r_ev, w_pop, pop_grad) -> dict[str, jax.Array]:
        world, data = prep.world, prep.data
        beta, C, D, n, d = spec.beta, spec.feature_bound, spec.reward_norm, spec.prompts, spec.d
        w_ref = world.w_ref
        diag = ev_phi[: min(self.diag_prompts, spec.eval_prompts)]

        f_eval = jax.vmap(lambda w: jax.vmap(objective, in_axes=(None, None, 0, 0, None))(w, w_ref, ev_phi, r_ev, beta))
        f_train = lambda w: jnp.mean(jax.vmap(objective, in_axes=(None, None, 0, 0, None))(w, w_ref, data.phi,
                                                                                             data.reward, beta))
        f_pop = f_eval(w_pop[None])[0]
        j_pop = jnp.mean(f_pop)

        out = {}
        # ---- the empirical optimum θ*_S, its neighbours, Lemma 1, the generalisation gap ---------------
        opt = fits["opt"]
        w_opt = opt.w_last                                     # [1 + R, d]
        f_opt = f_eval(w_opt)                                  # [1 + R, M]
        j_s_opt = f_train(w_opt[0])
        j_opt = jnp.mean(f_opt[0])
        out.update(
            opt_grad_norm=opt.grad_norm_last[0], opt_grad_norm_max=jnp.max(opt.grad_norm_last),
            pop_grad_norm=pop_grad, opt_dist=jnp.linalg.norm(w_opt[0] - w_pop),
            opt_dist_linear=jnp.linalg.norm(w_opt[0] - world.theta_star / beta),
            J_S_opt=j_s_opt, J_opt=j_opt, J_pop=j_pop, w_opt=w_opt[0], w_pop=w_pop,
            J_pop_se=jnp.std(f_pop, ddof=1) / jnp.sqrt(f_pop.shape[0]),
            gen_gap_opt=j_s_opt - j_opt, excess_opt=j_pop - j_opt,
            lemma1_actual=jnp.abs(j_s_opt - j_pop),
            b6_lemma1=lemma1_bound(n, reward_norm=D, feature_bound=C, delta=spec.delta),
            stab_opt=empirical_stability(f_opt[0], f_opt[1:]),
        )

        # ---- Assumption 5 and Γ₁ at S and every S^(r) ----------------------------------------------------
        variants = replace_one(data, new, idx)
        v_s = jax.vmap(mean_covariance)(w_opt, variants.phi)              # [1 + R, d, d]
        cov = jax.vmap(coverage_diagnostics, in_axes=(0, None))(v_s, diag)
        kw = dict(reward_norm=D, feature_bound=C, beta=beta)
        g_pairs = jnp.maximum(gamma1(n, cov.eps[0], cov.eps[1:], cov.sigma_max[0], cov.sigma_min_plus[0],
                                     cov.sigma_min_plus[1:], **kw),
                              gamma1(n, cov.eps[1:], cov.eps[0], cov.sigma_max[1:], cov.sigma_min_plus[1:],
                                     cov.sigma_min_plus[0], **kw))
        gam = jnp.max(g_pairs)
        out.update(a5_eps=cov.eps[0], a5_eps_max=jnp.max(cov.eps), vs_sigma_max=cov.sigma_max[0],
                   vs_sigma_min_plus=cov.sigma_min_plus[0], vs_sigma_min=eigvalsh(v_s[0])[0][0],
                   b6_gamma1=gam, b6_thm2=theorem2_stability_bound(n, gam, **kw))

        # ---- GA and SGA: trajectories (S), stability (S^(r)), Lemma 2 -------------------------------------
        lf = smoothness_bound(reward_norm=D, feature_bound=C, beta=beta, sigma_xi=spec.sigma_xi)
        radius = paper_radius(D, beta)
        visited = [w_pop[None], w_opt[:1]]
        for name in ("ga", "sga"):
            fit = fits[name]
            traj_w, traj_g = fit.traj_w[0], fit.traj_grad_norm[0]          # [J, d], [J]
            j_traj = jnp.mean(f_eval(traj_w), axis=1)                       # [J]
            js_traj = jax.vmap(f_train)(traj_w)                             # [J]
            best = _best_so_far(traj_g)
            f_last, f_best = f_eval(fit.w_last), f_eval(fit.w_best)
            out.update({
                f"{name}_excess_best": j_pop - j_traj[best], f"{name}_excess_last": j_pop - j_traj,
                f"{name}_opt_gap_best": j_s_opt - js_traj[best], f"{name}_opt_gap_last": j_s_opt - js_traj,
                f"{name}_grad2_best": jnp.square(traj_g[best]),
                f"{name}_grad_norm_last": fit.grad_norm_last[0],
                f"{name}_ball": jnp.max(jnp.linalg.norm(traj_w - w_ref, axis=1)) / radius,
                f"stab_{name}_last": empirical_stability(f_last[0], f_last[1:]),
                f"stab_{name}_best": empirical_stability(f_best[0], f_best[1:]),
                f"gen_gap_{name}_best": f_train(fit.w_best[0]) - jnp.mean(f_best[0]),
            })
            visited.append(traj_w)
        T = spec.steps
        ckpt = jnp.arange(1, T // spec.record_every + 1) * spec.record_every
        out["b6_lemma2"] = lemma2_bound(ckpt, lf, reward_norm=D, feature_bound=C)
        ga_traj = fits["ga"].traj_w[0]
        hess = jax.vmap(lambda w: mean_hessian(w, w_ref, data.phi, data.reward, beta))(ga_traj)
        hess_norm = jnp.max(jnp.abs(jax.vmap(lambda h: eigvalsh(h)[0])(hess)))
        out.update(L_F=jnp.asarray(lf, F64), hess_norm_max=hess_norm)

        # ---- Assumptions 3 and 4, Theorem 1 ---------------------------------------------------------------
        sig = jax.vmap(lambda w: assumption3_sigma(w, diag))(jnp.concatenate(visited))
        sigma_star, sigma_path = sig[0], jnp.min(sig)
        out.update(a3_sigma_star=sigma_star, a3_sigma_path=sigma_path,
                   a4_pivot=jnp.minimum(assumption4_pivot(diag), assumption4_pivot(data.phi)) / C,
                   b6_thm1_n=theorem1_threshold(sigma_path, d, reward_norm=D, feature_bound=C, beta=beta,
                                                delta=spec.delta))
        out["status"] = status_code(spec, out, lambda k: not k.startswith("b6_"))
        return out
