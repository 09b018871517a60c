"""Roofline of W1: hand counts of FLOPs and bytes per problem, and the machine's measured limits.

Counting conventions (README.md has the derivation table):

* a FLOP is one float add, multiply, divide, compare, max/min or clip side; a dot product
  of length d is 2d FLOPs; exp/log/sqrt are counted apart as *transcendentals*;
* random numbers are counted apart (normals and uniforms drawn), not as FLOPs;
* the count is of the W1 *algorithm* done once, the way R1 does it (the reference
  log-probabilities of the training prompts computed once, the Hessian of the BT fit
  in full, not exploiting symmetry), not of whatever an implementation recomputes;
* bytes: float32 arrays that the algorithm materialises are written once and read once
  per pass that uses them; the SGD loop reads its minibatch (features, rewards,
  reference log-probabilities, uniforms) from memory at every step. A fully fused kernel
  that drew data where it is consumed would need only its outputs (≈ 1 kB per problem):
  the byte count is a model of a materialising implementation, not a lower bound.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from common import W1, W1Shape

F32_BYTES = 4


def w1_counts(s: W1Shape = W1) -> dict[str, Any]:
    """FLOPs, transcendentals, random numbers and bytes of one W1 problem, by stage."""
    d, A, n, K, b, T, Np, Nt, M = s.d, s.A, s.n, s.K, s.b, s.T, s.n_pref, s.newton, s.M
    J = s.checkpoints
    L = 2 * A * d                      # logits of one prompt (A dot products)
    lsm = 4 * A                        # log-softmax: max, subtract, sum, subtract (+A exp, 1 log)
    icdf = A + 2 * K * A               # cumsum, K·A compares, K·A adds of the counts
    prompts_drawn = Np + n + M + n     # preference, training, evaluation, fresh

    stages = {}
    # 1. data: sphere features (norm², scale) for every prompt drawn
    stages["data_draw"] = dict(
        flops=prompts_drawn * A * (3 * d),
        transc=prompts_drawn * A,                                   # sqrt per row
        normals=prompts_drawn * A * d + d,
        uniforms=2 * Np + Np + n * K + n * K,
        bytes=prompts_drawn * A * d * F32_BYTES + (3 * Np + 2 * n * K) * F32_BYTES,   # written once
    )
    # 2. preference data: μ log-probs, two inverse-CDF draws, u = φ_a − φ_b, BT label
    per_pair = L + lsm + 4 * A + (A + 2 * 2 * A) + d + 2 * d + 4
    stages["preferences"] = dict(
        flops=Np * per_pair, transc=Np * (2 * A + 2), normals=0, uniforms=0,
        bytes=Np * A * d * F32_BYTES + Np * (d + 2) * F32_BYTES,    # read Φ once, write u, z
    )
    # 3. ridge BT fit: Nt Newton steps (gradient, Hessian, solve) and a final gradient
    grad = 2 * Np * d + 3 * Np + 2 * Np * d + Np + 2 * d
    hess = 2 * Np + Np * d + 2 * Np * d * d + d
    solve = (2 * d**3) // 3 + 2 * d * d
    stages["reward_fit"] = dict(
        flops=Nt * (grad + hess + solve) + grad, transc=(Nt + 1) * Np, normals=0, uniforms=0,
        bytes=(Nt * 3 + 1) * Np * d * F32_BYTES,                    # u read by s, g and H passes
    )
    # 4. training rewards r̂ = Φθ̂ and fixed reference log-probs, once
    stages["train_setup"] = dict(
        flops=n * L + n * (L + lsm), transc=n * (A + 1), normals=0, uniforms=0,
        bytes=2 * n * A * d * F32_BYTES + 2 * n * A * F32_BYTES,
    )
    # 5. SGD: b prompts per step, K rollouts each, RLOO score-function gradient
    per_prompt_step = (L + lsm + icdf + 3 * K + 2 * K + 4 * K     # logits, softmax, Y, clip ℓ, R, RLOO
                       + L + 2 * K * d + 2 * d + K + d + d)       # φ̄, Σ adv φ_Y, (Σadv)φ̄, subtract, batch mean
    stages["sgd"] = dict(
        flops=T * (b * per_prompt_step + 2 * d), transc=T * b * (A + 1), normals=0, uniforms=0,
        bytes=T * b * (A * d + 2 * A + K) * F32_BYTES,             # minibatch Φ, r̂, log π_ref, U each step
    )
    # 6. exact full-batch gradient norm at the J checkpoints
    per_prompt_grad = L + lsm + A + 2 * A + 2 * A + 3 * A + L + L + 2 * d + d
    stages["checkpoints"] = dict(
        flops=J * (n * per_prompt_grad + 2 * d), transc=J * n * (A + 1), normals=0, uniforms=0,
        bytes=J * n * (A * d + 2 * A) * F32_BYTES,
    )
    # 7. evaluation on M prompts exact over responses (+ weighted quantiles of |ℓ|: sort M·A keys)
    per_eval_prompt = 5 * L + 3 * lsm + 4 * A + 30 * A
    keys = M * A
    sort_ops = int(keys * np.log2(keys)) + 3 * keys
    stages["evaluation"] = dict(
        flops=M * per_eval_prompt + sort_ops, transc=M * (3 * (A + 1) + 3 * A), normals=0, uniforms=0,
        bytes=M * A * d * F32_BYTES + 2 * M * A * F32_BYTES * 3 + 10 * M * F32_BYTES,
    )
    # 8. Ĵ on a fresh sample and on the training sample (+ B1: O(1))
    per_sample_prompt = 2 * L + 2 * lsm + 4 * A + icdf + K + 3 * A
    stages["j_hat"] = dict(
        flops=2 * n * per_sample_prompt + n * L, transc=2 * n * 2 * (A + 1), normals=0, uniforms=0,
        bytes=2 * n * (A * d + A + K) * F32_BYTES,
    )
    total = {k: sum(st[k] for st in stages.values()) for k in ("flops", "transc", "normals", "uniforms", "bytes")}
    return {"stages": stages, "total": total,
            "notes": "W1 algorithm once per problem; see benchmarks/roofline.py and README.md"}


# ---- measured limits ------------------------------------------------------------------------
def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 matmul GFLOP/s: XLA (jnp.dot, jit) and NumPy (BLAS)."""
    import jax
    import jax.numpy as jnp
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    bm = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    ja, jb = jnp.asarray(a), jnp.asarray(bm)
    dot = jax.jit(jnp.dot)
    t_jax = _best_time(lambda: dot(ja, jb).block_until_ready(), repeats)
    t_np = _best_time(lambda: np.dot(a, bm), repeats)
    return {"size": size, "jax_gflops": flops / t_jax / 1e9, "numpy_gflops": flops / t_np / 1e9}


def elementwise_rate(elements: int = 1 << 16, fmas: int = 64, repeats: int = 20) -> dict[str, float]:
    """XLA's in-cache elementwise float32 FMA rate (a chain of ``fmas`` x·a+b per element): GFLOP/s.

    Most of W1's arithmetic is small contractions (d = 16, A = 8) that XLA emits as
    elementwise loops, not GEMM: this is the more attainable compute ceiling.
    """
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chain(x):
        y = x
        for i in range(fmas):
            y = y * jnp.float32(0.999) + jnp.float32(1e-3 * (i % 7))
        return y

    x = jnp.ones((64, elements), jnp.float32)
    t = _best_time(lambda: chain(x).block_until_ready(), repeats)
    return {"elements": 64 * elements, "gflops": 2.0 * fmas * 64 * elements / t / 1e9}


def bandwidth(working_set_bytes: int, repeats: int = 5) -> dict[str, float]:
    """Streaming bandwidth (GB/s, STREAM counting) over a working set of ``working_set_bytes``.

    copy: b ← a (2 arrays, 2 × bytes moved); add: c ← a + b (3 arrays, 3 ×). NumPy (one thread)
    and XLA (jit, may use both cores).
    """
    import jax
    import jax.numpy as jnp
    out = {"working_set_mb": working_set_bytes / 1e6}
    m2 = max(working_set_bytes // (2 * 4), 1024)
    m3 = max(working_set_bytes // (3 * 4), 1024)
    a = np.ones(m2, np.float32)
    bb = np.empty_like(a)
    t = _best_time(lambda: np.copyto(bb, a), repeats)
    out["numpy_copy_gbs"] = 2 * a.nbytes / t / 1e9
    a3, b3, c3 = np.ones(m3, np.float32), np.ones(m3, np.float32), np.empty(m3, np.float32)
    t = _best_time(lambda: np.add(a3, b3, out=c3), repeats)
    out["numpy_add_gbs"] = 3 * a3.nbytes / t / 1e9
    del a, bb, a3, b3, c3
    ja, jb = jnp.ones(m3, jnp.float32), jnp.ones(m3, jnp.float32)
    add = jax.jit(lambda x, y: x + y)
    t = _best_time(lambda: add(ja, jb).block_until_ready(), repeats)
    out["jax_add_gbs"] = 3 * m3 * 4 / t / 1e9
    jc = jnp.ones(m2, jnp.float32)
    cp = jax.jit(lambda x: x * jnp.float32(1.0000001))
    t = _best_time(lambda: cp(jc).block_until_ready(), repeats)
    out["jax_copy_gbs"] = 2 * m2 * 4 / t / 1e9
    out["best_gbs"] = max(v for k, v in out.items() if k.endswith("_gbs"))
    return out


def chunk_working_set_bytes(s: W1Shape, chunk: int) -> int:
    """Bytes a chunk keeps live at once in a materialising kernel: all of its problems' drawn data."""
    per_problem = (s.n_pref + s.n + s.M + s.n) * s.A * s.d * F32_BYTES + s.M * s.A * F32_BYTES * 6
    return chunk * per_problem


def measure(s: W1Shape, chunk: int, quick: bool = False) -> dict[str, Any]:
    mm = matmul_rate(1024 if quick else 2048, 3 if quick else 5)
    ew = elementwise_rate()
    ws = chunk_working_set_bytes(s, chunk)
    bw = bandwidth(ws)
    # the SGD loop's own working set: the training sets of a chunk
    bw_sgd = bandwidth(chunk * s.n * s.A * s.d * F32_BYTES)
    return {"matmul": mm, "elementwise": ew, "bandwidth_chunk": bw, "bandwidth_sgd_set": bw_sgd,
            "peak_gflops": max(mm["jax_gflops"], mm["numpy_gflops"]), "peak_gbs": bw["best_gbs"]}


def fractions(rate: float, counts: dict[str, Any], limits: dict[str, Any]) -> dict[str, float]:
    """Fractions of the compute and bandwidth limits reached at ``rate`` problems/s."""
    F, B = counts["total"]["flops"], counts["total"]["bytes"]
    compute_limit = limits["peak_gflops"] * 1e9 / F          # problems/s if matmul-rate bound
    memory_limit = limits["peak_gbs"] * 1e9 / B              # problems/s if bandwidth bound
    elem_limit = limits["elementwise"]["gflops"] * 1e9 / F
    return {
        "achieved_gflops": rate * F / 1e9,
        "achieved_gbs": rate * B / 1e9,
        "compute_limit_problems_per_s": compute_limit,
        "memory_limit_problems_per_s": memory_limit,
        "elementwise_limit_problems_per_s": elem_limit,
        "compute": rate / compute_limit,
        "memory": rate / memory_limit,
        "lower_limit": rate / min(compute_limit, memory_limit),
        "elementwise": rate / elem_limit,
    }


if __name__ == "__main__":
    import json
    c = w1_counts()
    for name, st in c["stages"].items():
        print(f"{name:12s} {st['flops'] / 1e6:8.3f} MFLOP {st['bytes'] / 1e6:8.3f} MB "
              f"{st['transc'] / 1e3:7.1f} k transc {st['normals'] / 1e3:7.1f} k normals")
    t = c["total"]
    print(f"{'total':12s} {t['flops'] / 1e6:8.3f} MFLOP {t['bytes'] / 1e6:8.3f} MB "
          f"{t['transc'] / 1e3:7.1f} k transc {t['normals'] / 1e3:7.1f} k normals {t['uniforms']} uniforms")
    print(json.dumps(measure(W1, 64), indent=1))
