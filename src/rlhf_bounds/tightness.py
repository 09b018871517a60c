"""The tightness ladder of B1's sampling and reward-shift terms (docs/theory.md §18).

For a fixed trained policy w, every problem gets, beside the default kernel's columns:

* the rungs of the sampling term on the fresh sample (``bounds._tightness``): the paper's Hoeffding
  form by level (``rung_hoeffding_*``), the kl form (``rung_kl_*``), and the Bernstein forms
  (``rung_bernstein_*``: Maurer–Pontil's empirical Bernstein on the prompts, Bernstein with the exact
  conditional variance on the rollouts), with the inputs they need (``fresh_prompt_var``: the sample
  variance of h_w over the fresh prompts; ``fresh_rollout_var``: σ̄², the mean exact conditional
  variance of r̂ − βℓ^τ over them);
* the per-problem floor's raw material: ``redraw_J_hat`` ``[R]`` (Ĵ_r) and ``redraw_h_bar`` ``[R]``
  (h̄_r, its expectation over the rollouts) on R further fresh samples of n prompts and K rollouts for
  the same w, each from its own key (Ĵ only: cheap), so that :func:`sampling_floor` gives
  q_δ(w), the (1 − δ)-quantile of |Ĵ − EĴ|, with a distribution-free interval;
* the reward-shift rung: ``l2_policy`` = E_{D_w}[(r̂ − r*)²] on the evaluation set. By Jensen
  √l2_policy ≥ |E_{D_w}[r̂ − r*]| on every problem (``rung_shift_l2_policy``, a deterministic bound);
  B1's √(1 + χ²)√L²_train over it is the price of the change of measure alone, and √l2_policy over
  the exact term the price of bounding a mean by a root mean square.
* with ``spec.bounds == 'all'``, B2's rungs (:func:`b2_rung_columns`): the Gaussian-posterior bound as
  used, without the union bound over the σ₀ grid, without the Monte Carlo radii, and in the
  square-root form; the Occam bound in both forms.

The kernel (:class:`TightnessKernel`) is :func:`rlhf_bounds.simulate.simulate_batch` with these columns
as its ``extra`` (the default stages, unchanged, then the ladder per problem).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import bounds, gap
from .policy import inverse_cdf, log_probs, response_objective
from .simulate import Prepared, reward_hat, simulate_batch
from .spec import Spec, SpecError
from .world import draw_prompts, true_reward

__all__ = ["REDRAW_STREAM", "TightnessKernel", "sample_moments", "ladder_columns", "b2_rung_columns",
           "sampling_floor", "quantile_rank_interval"]

F32 = jnp.float32

#: fold_in tag of the redraws' key stream: fold_in(the problem's fresh-sample key, REDRAW_STREAM) is independent
#: of the two keys ``simulate.finish`` splits from that key for the fresh sample (a different threefry input).
REDRAW_STREAM = 0x7E57


def sample_moments(w, w_ref, phi, r_hat, u, beta, tau) -> dict[str, jax.Array]:
    """On a sample of prompts ``phi`` ``[n, A, d]`` with rollout uniforms ``u`` ``[n, K]``: Ĵ, h̄ = (1/n)Σ_i h_w(x_i),
    the unbiased sample variance of the h_w(x_i) (``prompt_var``, 0 for n = 1) and σ̄² = (1/n)Σ_i
    Var_{a∼π_w(·|x_i)}[r̂ − βℓ^τ] (``rollout_var``, exact over responses)."""
    def one(phi_i, r_i, u_i):
        lp = log_probs(w, phi_i)
        p = jnp.exp(lp)
        g = response_objective(r_i, lp - log_probs(w_ref, phi_i), beta, tau)
        h = jnp.sum(p * g)
        return jnp.mean(g[inverse_cdf(p, u_i)]), h, jnp.sum(p * jnp.square(g - h))

    rollout_means, h, var = jax.vmap(one)(phi, r_hat, u)
    n = h.shape[0]
    h64 = h.astype(jnp.float64)
    prompt_var = jnp.sum(jnp.square(h64 - jnp.mean(h64))) / max(n - 1, 1)
    return {"J_hat": jnp.mean(rollout_means), "h_bar": jnp.mean(h), "prompt_var": prompt_var,
            "rollout_var": jnp.mean(var.astype(jnp.float64))}


def _fresh_sample(spec: Spec, prep: Prepared, key):
    """n prompts and their n × K uniforms from ``key``, drawn exactly as ``simulate.finish`` draws its fresh sample."""
    k_p, k_u = jax.random.split(key)
    prompts = draw_prompts(spec, prep.world, k_p, spec.prompts)
    u = jax.random.uniform(k_u, (spec.prompts, spec.rollouts), F32)
    return prompts.phi, reward_hat(spec, prep.theta_hat, prompts), u


def ladder_columns(spec: Spec, prep: Prepared, w, out: dict, redraws: int, redraw_batch: int
                   ) -> dict[str, jax.Array]:
    """The tightness ladder's columns for one problem (module docstring); ``out`` = ``simulate.finish``'s columns."""
    n, K, beta, tau, delta = spec.prompts, spec.rollouts, spec.beta, spec.tau, spec.delta
    w_ref = prep.world.w_ref
    width = bounds.objective_range(out["reward_range"], beta, tau, out["log_ratio_range"])  # B1's W_τ
    lo = -0.5 * width  # r̂ and the clipped log-ratio term are symmetric about 0 (sup r̂ = −inf r̂)

    fresh = sample_moments(w, w_ref, *_fresh_sample(spec, prep, prep.keys.fresh), beta, tau)
    hoeff = bounds.hoeffding_sampling_terms(n, K, width, delta)
    kl = bounds.kl_sampling_bound(fresh["h_bar"], fresh["J_hat"], n, K, lo, width, delta)
    bern = bounds.bernstein_sampling_bound(fresh["prompt_var"], fresh["rollout_var"], n, K, width, delta)
    cols = {"fresh_prompt_var": fresh["prompt_var"], "fresh_rollout_var": fresh["rollout_var"],
            "objective_width": width}
    for name, rung in (("hoeffding", hoeff), ("kl", kl), ("bernstein", bern)):
        cols.update({f"rung_{name}_prompt": rung.prompt, f"rung_{name}_rollout": rung.rollout,
                     f"rung_{name}_total": rung.total})

    # ---- R redraws of the fresh sample for the same w: Ĵ only ---------------------------------
    keys = jax.random.split(jax.random.fold_in(prep.keys.fresh, REDRAW_STREAM), redraws)

    def redraw(k):
        m = sample_moments(w, w_ref, *_fresh_sample(spec, prep, k), beta, tau)
        return m["J_hat"], m["h_bar"]

    j_r, h_r = jax.lax.map(redraw, keys, batch_size=min(redraw_batch, redraws))
    cols["redraw_J_hat"], cols["redraw_h_bar"] = j_r, h_r

    # ---- the reward-shift rung: E_{D_w}[(r̂ − r*)²] on the evaluation set ---------------------
    ev = draw_prompts(spec, prep.world, prep.keys.eval, spec.eval_prompts)
    diff = reward_hat(spec, prep.theta_hat, ev) - true_reward(spec, prep.world, ev)
    p = jnp.exp(jax.vmap(log_probs, in_axes=(None, 0))(w, ev.phi))
    cols["l2_policy"] = jnp.mean(jnp.sum(p * diff * diff, axis=-1))
    cols["rung_shift_l2_policy"] = jnp.sqrt(cols["l2_policy"].astype(jnp.float64))
    return cols


def b2_rung_columns(spec: Spec, prep: Prepared, w, out: dict) -> dict[str, jax.Array]:
    """B2's rungs for one problem (``spec.bounds == 'all'``), beside the catalogue's B2 columns:

    * Gaussian posterior, sampling part as the catalogue computes it (``b2r_gauss_used`` = PAC-Bayes at
      δ_PB/G with KL at the best σ₀ of the grid, plus its Monte Carlo radius: ``b2_gauss_sampling`` +
      ``b2_gauss_mc``); ``b2r_gauss_no_union``: the same at δ_PB for the best σ₀ (what the bound would be had
      that prior been fixed in advance: the union bound's price; not a valid bound when σ₀ is chosen after
      the data); ``b2r_gauss_no_mc``: the Monte Carlo radii set to 0 (the Monte Carlo price; the exact
      E_Q would be needed for validity); ``b2r_gauss_sqrt``: the square-root (McAllester) prompt level in
      place of the kl-inverse one (valid; at a known q̂ never smaller than the kl form, but it does not
      depend on q̂, so unlike the kl form it pays nothing for q̂'s Monte Carlo radius and can be smaller);
    * Occam: ``b2r_occam_sqrt``, the square-root form of ``b2_occam_sampling`` (valid).

    Recomputes the posterior and its draws with the catalogue's public functions on the same keys.
    """
    from . import catalogue
    from .world import behaviour_log_probs

    n, K, beta, tau, delta = spec.prompts, spec.rollouts, spec.beta, spec.tau, spec.delta
    ev = draw_prompts(spec, prep.world, prep.keys.eval, spec.eval_prompts)
    log_mu = jax.vmap(lambda phi: behaviour_log_probs(spec, prep.world, phi))(ev.phi)
    evalset = gap.EvalSet(ev.phi, reward_hat(spec, prep.theta_hat, ev), true_reward(spec, prep.world, ev), log_mu)
    stats = gap.prompt_stats(w, prep.world.w_ref, evalset, beta, tau)
    problem = catalogue.Problem(w, prep.world.w_ref, prep.data, evalset, stats, gap.population_means(stats),
                                prep.theta_hat, prep.world.theta_star, prep.pref_u, prep.pref_z, out["reward_range"],
                                out["log_ratio_range"], prep.keys.posterior)
    post = catalogue.gauss_posterior(spec, problem)
    draws = catalogue.gauss_draws(spec, problem, post)
    width = bounds.objective_range(out["reward_range"], beta, tau)
    m, G = spec.posterior_draws, len(catalogue.PRIOR_SCALES)
    mc_prompt = bounds.mc_error_hoeffding(width, m, catalogue.MC_SHARE * delta)
    mc_sampling = bounds.mc_error_hoeffding(2.0 * width, m, catalogue.MC_SHARE * delta)
    emp = jnp.mean(draws["j_hat_prompts"])
    at = lambda kl, d, radius: bounds.b2_sampling_bound(emp, kl, n, K, -0.5 * width, width, d, mc_radius=radius)
    used = at(post.kl, catalogue.PB_SHARE * delta / G, mc_prompt)
    no_union = at(post.kl, catalogue.PB_SHARE * delta, mc_prompt)
    no_mc = at(post.kl, catalogue.PB_SHARE * delta / G, 0.0)
    vacuous = lambda x: jnp.where(jnp.isfinite(width), x, jnp.inf)

    # Occam: the square-root form of the same event.
    radius, spacing = spec.occam_radius, spec.occam_spacing
    w_q = bounds.occam_quantize(w - prep.world.w_ref, radius, spacing).astype(w.dtype) + prep.world.w_ref
    occ_width = bounds.objective_range(out["reward_range"], beta, tau,
                                       bounds.log_ratio_range(spec.feature_bound, radius * jnp.sqrt(spec.d)))
    d = prep.data
    _, h_q = gap.sample_objective(w_q, prep.world.w_ref, d.phi, d.reward, d.u, beta, tau)
    occ = bounds.b2_sampling_bound(h_q, bounds.occam_log_cardinality(spec.d, radius, spacing), n, K,
                                   -0.5 * occ_width, occ_width, delta)
    return {"b2r_gauss_used": vacuous(used.total + mc_sampling), "b2r_gauss_no_union": vacuous(no_union.total + mc_sampling),
            "b2r_gauss_no_mc": vacuous(no_mc.total), "b2r_gauss_sqrt": vacuous(used.total_sqrt + mc_sampling),
            "b2r_occam_kl": occ.total, "b2r_occam_sqrt": occ.total_sqrt}


@dataclasses.dataclass(frozen=True)
class TightnessKernel:
    """The default kernel's columns plus the tightness ladder's (:func:`ladder_columns`) for every problem.

    ``redraws``: R, the fresh samples redrawn per problem for the floor q_δ(w); ``redraw_batch``: how
    many of them are drawn at once (memory: ``redraw_batch``·n·A·d floats per problem in flight).
    It is :func:`rlhf_bounds.simulate.simulate_batch` with these columns as its ``extra``: the default
    columns bit for bit, and a problem's results do not depend on its chunk.
    """

    redraws: int = 400
    redraw_batch: int = 16
    finish_block: int | None | str = "auto"

    def __post_init__(self):
        if not isinstance(self.redraws, int) or self.redraws < 2:
            raise SpecError(f"redraws={self.redraws!r} is not allowed: must be a whole number ≥ 2")
        if not isinstance(self.redraw_batch, int) or self.redraw_batch < 1:
            raise SpecError(f"redraw_batch={self.redraw_batch!r} is not allowed: must be a whole number ≥ 1")

    @property
    def name(self) -> str:
        # the redraws' block width and the finishing block shape the compiled reductions: part of the identity
        extra = "" if self.redraw_batch == 16 else f"-b{self.redraw_batch}"
        extra += "" if self.finish_block == "auto" else f"-f{self.finish_block}"
        return f"tightness-R{self.redraws}{extra}"

    def work_units(self, spec: Spec) -> float:
        """One problem's work in the units of :func:`rlhf_bounds.suites.estimate_seconds`: the default
        kernel's, the R redraws of n prompts and K rollouts, and with ``bounds='all'`` B2's rungs again."""
        from .suites._framework import work_units

        base = work_units(spec)
        redraws = self.redraws * spec.prompts * spec.actions * spec.d * (1 + spec.rollouts / 8)
        b2 = 0.5 * (spec.posterior_draws + 1) * (spec.eval_prompts + spec.prompts) * spec.actions * spec.d
        return base + redraws + (b2 if spec.bounds == "all" else 0.0)

    def __call__(self, spec: Spec, keys: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
        def extra(spec, prep, fit, out):
            cols = ladder_columns(spec, prep, fit.w_last, out, self.redraws, self.redraw_batch)
            if spec.bounds == "all":
                cols.update(b2_rung_columns(spec, prep, fit.w_last, out))
            return cols

        return simulate_batch(spec, keys, shared_key, self.finish_block, extra=extra)


# ---- the floor, from the saved redraws (NumPy) -----------------------------------------------

def _binomial_cdf(R: int, p: float) -> np.ndarray:
    """P(Bin(R, p) ≤ j) for j = 0..R, 0 < p < 1, from the log-pmf (no SciPy at run time)."""
    j = np.arange(R + 1)
    logpmf = (np.array([math.lgamma(R + 1) - math.lgamma(i + 1) - math.lgamma(R - i + 1) for i in j])
              + j * math.log(p) + (R - j) * math.log1p(-p))
    pmf = np.exp(logpmf - logpmf.max())
    return np.cumsum(pmf) / pmf.sum()


def quantile_rank_interval(R: int, level: float, confidence: float = 0.95) -> tuple[int, int, int]:
    """(k, l, u), 1-based order statistics of R i.i.d. draws: X_(k) with k = ⌈level·R⌉ estimates the
    ``level``-quantile, and [X_(l), X_(u)] covers it with probability ≥ ``confidence`` (distribution-free:
    P(X_(l) ≤ q < X_(u)) ≥ P(l ≤ B < u) for B ~ Bin(R, level), the count of draws below q).

    l is the largest rank with P(B < l) ≤ α/2 and u the smallest with P(B ≥ u) ≤ α/2 (clipped to 1..R).
    """
    if R < 1 or not 0 < level < 1:
        raise ValueError(f"R={R}, level={level}: need R ≥ 1 and 0 < level < 1")
    alpha = 1.0 - confidence
    cdf = _binomial_cdf(R, level)                    # cdf[j] = P(B ≤ j)
    below = np.concatenate([[0.0], cdf[:-1]])        # below[l] = P(B < l) = P(B ≤ l − 1)
    l_candidates = np.nonzero(below <= alpha / 2)[0]
    l = int(max(l_candidates.max(), 1)) if l_candidates.size else 1
    at_least = 1.0 - below                           # at_least[u] = P(B ≥ u)
    u_candidates = np.nonzero(at_least <= alpha / 2)[0]
    u = int(min(u_candidates.min(), R)) if u_candidates.size else R
    k = min(max(int(math.ceil(level * R)), 1), R)
    return k, l, u


def sampling_floor(j_hat: np.ndarray, h_bar: np.ndarray, delta: float, confidence: float = 0.95
                   ) -> dict[str, np.ndarray]:
    """q_δ(w) per problem from its R redraws, ``j_hat`` and ``h_bar`` ``[N, R]`` (Ĵ_r and h̄_r).

    EĴ is estimated by the mean of the h̄_r (R·n prompts, exact over responses: far more than the
    evaluation set's M when R·n ≫ M; its standard error is sd(h̄_r)/√R, returned as ``centre_se``).
    ``q``: the order statistic of rank ⌈(1 − δ)R⌉ of |Ĵ_r − EĴ|, with the distribution-free
    ``confidence`` interval of :func:`quantile_rank_interval` (``lo``, ``hi``) and its relative
    half-width (``rel_error``); ``q_prompt``: the same for the prompt level |h̄_r − EĴ|.
    """
    j_hat, h_bar = (np.asarray(x, np.float64) for x in (j_hat, h_bar))
    R = j_hat.shape[-1]
    centre = h_bar.mean(axis=-1, keepdims=True)
    k, l, u = quantile_rank_interval(R, 1.0 - delta, confidence)
    e = np.sort(np.abs(j_hat - centre), axis=-1)
    ep = np.sort(np.abs(h_bar - centre), axis=-1)
    q, lo, hi = e[..., k - 1], e[..., l - 1], e[..., u - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(q > 0, (hi - lo) / (2.0 * q), np.nan)
    return {"q": q, "lo": lo, "hi": hi, "rel_error": rel, "q_prompt": ep[..., k - 1],
            "centre_se": h_bar.std(axis=-1, ddof=1) / np.sqrt(R), "R": R}
