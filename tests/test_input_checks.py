"""Specs are checked where they are made, range texts read naturally, and saved JSON is strict JSON.

The spec and store checks need no compilation; one tiny τ = ∞ run (the spec of
tests/test_reliability.py, one compilation) checks that its record is strict JSON and resumes.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds import store
from rlhf_bounds.spec import FIELDS, SpecError, _range_text

TINY = dict(d=3, actions=3, prompts=16, rollouts=2, pref_pairs=32, eval_prompts=32, steps=4, record_every=2,
            batch=4, feature_law="anisotropic")


def strict_loads(text: str):
    """``json.loads`` that refuses Infinity, -Infinity and NaN, as strict JSON parsers do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# ---- a spec is checked when it is made -------------------------------------------------------------
@pytest.mark.parametrize("changes, text", [
    (dict(beta=-1), "beta=-1 out of range: must be in (0, inf)"),
    (dict(beta=0.0), "beta=0.0 out of range: must be in (0, inf)"),
    (dict(tau=-1.0), "tau=-1.0 out of range: must be in [0, inf]"),
    (dict(d=0), "d=0 out of range"),
    (dict(steps=5), "record_every=50 out of range: must divide steps=5"),
    (dict(learner="adam"), "learner='adam' is not allowed"),
])
def test_construction_refuses_a_bad_value_in_one_line(changes, text):
    with pytest.raises(SpecError) as err:
        rb.Spec(**changes)
    assert text in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SpecError) as again:  # the same message as replace() gives
        rb.Spec().replace(**changes)
    assert str(again.value) == str(err.value)


def test_jax_rebuilds_specs_from_placeholders_without_checking_them():
    spec = rb.Spec(**TINY)
    zeros = jax.tree_util.tree_map(lambda x: 0.0, spec)  # beta = 0 would be refused by the constructor
    assert zeros.beta == 0.0 and zeros.d == spec.d
    # jit and vmap rebuild the spec from tracers and axis placeholders
    assert float(jax.jit(lambda s: s.beta * 2)(spec)) == 2 * spec.beta
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), spec, spec.replace(beta=0.25))
    np.testing.assert_allclose(jax.vmap(lambda s: s.beta + s.lr)(stacked), [1.5, 1.25])
    grads = jax.grad(lambda s: s.beta * s.lr)(spec.replace(beta=0.5, lr=2.0))
    assert grads.beta == 2.0 and grads.tau == 0.0
    # key paths still name the fields
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(spec)[0]]
    assert ".beta" in paths and ".tau" in paths


# ---- range texts --------------------------------------------------------------------------------
def test_a_field_open_to_minus_infinity_reads_naturally():
    assert _range_text(FIELDS["shift"].metadata) == "(-inf, inf)"
    with pytest.raises(SpecError) as err:
        rb.Spec(shift=-math.inf)
    assert str(err.value) == "shift=-inf out of range: must be a finite number"
    with pytest.raises(SpecError) as err:
        rb.Spec(shift=math.nan)
    assert str(err.value) == "shift=nan is not allowed: must be a finite number"
    with pytest.raises(SpecError) as err:
        rb.Spec(shift="left")
    assert str(err.value) == "shift='left' is not a number: must be a finite number"
    with pytest.raises(SpecError) as err:  # a bounded field keeps its range
        rb.Spec(beta=math.inf)
    assert str(err.value) == "beta=inf out of range: must be finite, in (0, inf)"


# ---- strict JSON ----------------------------------------------------------------------------------
def test_json_writes_non_finite_floats_as_strings(tmp_path):
    path = tmp_path / "x.json"
    store.write_json_atomic(path, {"tau": math.inf, "low": -math.inf, "bad": math.nan, "f32": np.float32("inf"),
                                   "arr": np.array([1.0, np.inf]), "nested": [{"v": (math.inf, 2)}], "ok": 0.5})
    data = strict_loads(path.read_text())
    assert data == {"tau": "inf", "low": "-inf", "bad": "nan", "f32": "inf", "arr": [1.0, "inf"],
                    "nested": [{"v": ["inf", 2]}], "ok": 0.5}


def test_spec_from_json_reads_the_strings_back():
    spec = rb.Spec(tau=math.inf)
    text = json.dumps(store.json_safe(spec.to_dict()), allow_nan=False)
    back = rb.Spec.from_dict(json.loads(text))
    assert back == spec and back.tau == math.inf
    assert rb.Spec.from_dict({"tau": "inf"}).tau == math.inf
    with pytest.raises(SpecError, match=r"tau=-inf out of range"):
        rb.Spec.from_dict({"tau": "-inf"})
    with pytest.raises(SpecError, match=r"beta=inf out of range: must be finite"):
        rb.Spec.from_dict({"beta": "inf"})
    with pytest.raises(SpecError, match=r"beta=nan is not allowed"):
        rb.Spec.from_dict({"beta": "nan"})


def test_identity_of_a_record_read_back_matches():
    identity = {"kernel": "simulate", "spec": rb.Spec().to_dict(), "seed": 0, "problems": 4, "chunk_size": 4}
    written = strict_loads(json.dumps(store.json_safe(identity)))
    assert written["spec"]["tau"] == "inf"
    assert store.identity_mismatch(written, identity) is None
    legacy = json.loads(json.dumps(identity))  # a record written before: "Infinity", read back as inf
    assert store.identity_mismatch(legacy, identity) is None
    other = {**identity, "spec": {**identity["spec"], "tau": 1.0}}
    assert "a different spec (tau='inf' there, 1.0 now)" == store.identity_mismatch(written, other)


def test_tau_infinite_run_writes_strict_json_and_resumes(tmp_path):
    out = tmp_path / "run"
    spec = rb.Spec(**TINY, tau=math.inf)
    full = rb.run(spec, 3, seed=2, chunk_size=1, progress=False, out=out)
    record = strict_loads((out / "record.json").read_text())
    assert record["spec"]["tau"] == "inf"
    assert full.spec.tau == math.inf
    (out / "chunks" / "chunk-000002.npz").unlink()
    again = rb.run(spec, 3, seed=2, chunk_size=1, progress=False, out=out)
    assert again.record["resumed_chunks"] == 2 and again.complete
    np.testing.assert_array_equal(again["gap_total"], full["gap_total"])
    strict_loads((out / "record.json").read_text())


# ---- an unreadable chunk -------------------------------------------------------------------------
def test_an_unreadable_chunk_says_what_was_found_and_what_to_do(tmp_path):
    run = tmp_path / "run"
    (run / "chunks").mkdir(parents=True)
    (run / "chunks" / "chunk-000000.npz").write_bytes(b"PK\x03\x04 torn")
    store.write_json_atomic(run / "record.json", {"spec": rb.Spec().to_dict(), "problems": 4})
    with pytest.raises(rb.LoadError) as err:
        rb.load(run)
    text = str(err.value)
    assert "chunk-000000.npz: the chunk file cannot be read (truncated, or not a chunk file: " in text
    assert text.endswith("; rerun the same command to recompute it") and "damaged" not in text
