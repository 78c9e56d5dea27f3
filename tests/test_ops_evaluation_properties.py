"""Property tests (hypothesis) of the public ops and evaluation functions on random shapes (0 and 1
included), dtypes, NaN / inf and extreme magnitudes: each call gives the correct result (against a
float64 truth from the reference code) or a ValueError, and tame input (finite, |v| <= 1e10) is never
rejected. Strategies: tests/_strategies.py. `CI=1` selects a derandomized profile (tests/conftest.py)."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from benchmarks.reference import eval_numpy, rerank_numpy
from dpm_ops.evaluation import evaluate_rank, pairwise_distance, re_ranking, rerank_features
from dpm_ops.losses import batch_hard_soft_margin_triplet, masked_arcface_cross_entropy
from dpm_ops import ops
from dpm_ops._precision import compute_dtype
from dpm_ops.ops._checks import row_norm_floor
from dpm_ops.ops.hem_loss_reference import hem_loss_reference
from dpm_ops.ops.hierarchical_mask_pool_reference import hierarchical_mask_pool_reference
from dpm_ops.ops.masked_cosine import ARCCOS_CLIP
from dpm_ops.ops.masked_cosine_reference import masked_cosine_reference
from dpm_ops.ops.maskreid_ranking_loss import exp_safe_norm
from dpm_ops.ops.maskreid_ranking_loss_reference import NEG_MODES, POS_MODES, maskreid_ranking_loss_reference
from tests._strategies import (
    FULL_DTYPES,
    assert_close,
    backends,
    dtypes,
    is_tame,
    labels,
    outcome,
    sizes,
    tensors,
)

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KERNELS = ("reference", "cpp", "triton")


def largest(t: torch.Tensor, dim=-1) -> float:
    """The largest row norm (the scale a GEMM's rounding error follows)."""
    return float(torch.linalg.vector_norm(t.double(), dim=dim).max()) if t.numel() else 0.0


@FEW
@given(
    data=st.data(), b=sizes(), k=sizes(), c=sizes(), dtype=dtypes(), backend=backends(*KERNELS), arccos=st.booleans()
)
def test_masked_cosine(data, b, k, c, dtype, backend, arccos):
    x, mask, protos = (
        data.draw(tensors(shape, dtype, positive=name == "mask"), label=name)
        for name, shape in (("x", (b, c)), ("mask", (b, c)), ("protos", (k, c)))
    )
    op = ops.masked_arccos_distance if arccos else ops.masked_cosine
    got = outcome(lambda: op(x, mask, protos, backend=backend))
    if got is None:
        assert not is_tame(x, mask, protos) or dtype not in FULL_DTYPES and backend == "triton"
        return
    truth = masked_cosine_reference(x.double(), mask.double(), protos.double(), 1e-12)
    if arccos:  # arccos' slope at the clip, 1 / sqrt(1 - (1 - 1e-5)^2) ~ 224, scales the cosine's error
        truth = torch.arccos(truth.clamp(-1 + ARCCOS_CLIP, 1 - ARCCOS_CLIP))
    assert_close(got, truth, dtype, magnitude=250.0 if arccos else 1.0)


@FEW
@given(
    data=st.data(),
    b=sizes(),
    c=sizes(),
    dtype=st.sampled_from(FULL_DTYPES),
    backend=backends("cpp", "triton"),
    fused=st.booleans(),
)
def test_batch_hard_triplet(data, b, c, dtype, backend, fused):
    features = data.draw(tensors((b, c), dtype), label="features")
    ids = data.draw(labels(b), label="labels")
    if fused:
        got = outcome(lambda: ops.batch_hard_triplet(features, ids, backend=backend))
    else:
        got = outcome(lambda: batch_hard_soft_margin_triplet(features, ids, backend="reference"))
    if got is None:
        assert not is_tame(features) or b == 0
        return
    truth = batch_hard_soft_margin_triplet(features.double(), ids, backend="reference")
    # d = sqrt(|x|^2 + |y|^2 - 2 x.y): the rounding of the squares, ~eps |x|^2, becomes ~sqrt(eps) |x| in d.
    assert_close(got, truth, dtype, magnitude=(1e3 if dtype == torch.float32 else 1e5) * largest(features))


@FEW
@given(
    data=st.data(),
    b=sizes(),
    heads=sizes(1, 4),
    n=sizes(),
    dtype=dtypes(),
    backend=backends(*KERNELS),
    reduction=st.sampled_from(["sum", "mean"]),
)
def test_hem_loss(data, b, heads, n, dtype, backend, reduction):
    logits = data.draw(tensors((b, heads, n), dtype), label="cls_logits")
    got = outcome(lambda: ops.hem_loss(logits, reduction=reduction, backend=backend))
    if got is None:
        assert not is_tame(logits) or (b == 0 and reduction == "mean") or 0 in (heads, n)  # no head, no token
        return
    assert_close(got, hem_loss_reference(logits.double(), 1e-6, reduction), dtype, magnitude=b)


@FEW
@given(
    data=st.data(),
    b=sizes(),
    d=sizes(),
    dtype=dtypes(),
    backend=backends(*KERNELS),
    neg_mode=st.sampled_from(NEG_MODES),
    pos_mode=st.sampled_from(POS_MODES),
)
def test_maskreid_ranking_loss(data, b, d, dtype, backend, neg_mode, pos_mode):
    assume(pos_mode != "eq4" or neg_mode == "literal")  # neg_mode does not apply to Eq. 4 (a ValueError)
    embeddings = data.draw(tensors((b, d), dtype), label="embeddings")
    ids = data.draw(labels(b), label="labels")
    got = outcome(
        lambda: ops.maskreid_ranking_loss(embeddings, ids, neg_mode=neg_mode, pos_mode=pos_mode, backend=backend)
    )
    if got is None:
        exp_safe = pos_mode == "eq4" or b == 0 or largest(embeddings) <= exp_safe_norm(torch.float32, 0.15, b)
        assert not (is_tame(embeddings) and exp_safe) or b == 0
        return
    truth = maskreid_ranking_loss_reference(embeddings.double(), ids, 0.15, 2.0, neg_mode, pos_mode)
    assert_close(got, truth, dtype, magnitude=10 * largest(embeddings) ** 2)  # similarities are |x|^2-sized


@FEW
@given(
    data=st.data(),
    b=sizes(),
    c=sizes(),
    h=sizes(1, 4),
    w=sizes(1, 4),
    dtype=dtypes(),
    backend=backends(*KERNELS),
    mode=st.sampled_from(["avg", "max"]),
    masked=st.booleans(),
)
def test_hierarchical_mask_pool(data, b, c, h, w, dtype, backend, mode, masked):
    features = data.draw(tensors((b, c, h, w), dtype), label="features")
    mask = data.draw(tensors((b, 1, 2 * h, w + 1), dtype, positive=True), label="mask") if masked else None
    got = outcome(lambda: ops.hierarchical_mask_pool([features], mask, mode, backend=backend))
    if got is None:
        assert not is_tame(features, *([mask] if masked else []))
        return
    truth = hierarchical_mask_pool_reference([features.double()], None if mask is None else mask.double(), mode)
    assert_close(got, truth, dtype, magnitude=float(features.double().abs().max()) if features.numel() else 1.0)


@FEW
@given(
    data=st.data(),
    b=sizes(),
    k=sizes(),
    c=sizes(),
    dtype=st.sampled_from(FULL_DTYPES),
    backend=backends("cpp", "triton"),
    fused=st.booleans(),
)
def test_masked_arcface_cross_entropy(data, b, k, c, dtype, backend, fused):
    features, mask, weight = (
        data.draw(tensors(shape, dtype, positive=name == "mask"), label=name)
        for name, shape in (("features", (b, c)), ("mask", (b, c)), ("weight", (k, c)))
    )
    ids = data.draw(labels(b, max(k, 1)), label="labels")
    if fused:
        got = outcome(lambda: ops.masked_arcface_ce(features, mask, weight, ids, backend=backend))
    else:
        got = outcome(lambda: masked_arcface_cross_entropy(features, mask, weight, ids, backend="reference"))
    if got is None:
        assert not is_tame(features, mask, weight) or k == 0 or b == 0
        return
    truth = masked_arcface_cross_entropy(features.double(), mask.double(), weight.double(), ids, backend="reference")
    # the plain branch's logits f.W are |f||W|-sized; the ArcFace branch's are bounded by the scale 30
    assert_close(got, truth, dtype, magnitude=30 + largest(features) * largest(weight))


@MANY
@given(data=st.data(), q=sizes(), g=sizes(), dtype=dtypes(), ids=st.integers(1, 3))
def test_evaluate_rank(data, q, g, dtype, ids):
    dist = data.draw(tensors((q, g), dtype, positive=True), label="distmat")
    q_pids, g_pids = data.draw(labels(q, ids)), data.draw(labels(g, ids))
    q_cams, g_cams = data.draw(labels(q, 2)), data.draw(labels(g, 2))
    max_rank = data.draw(st.sampled_from([1, 3, 10**9]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_rank past the gallery: tested in test_bad_input_ops.py
        got = outcome(lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank))
    ranked = dist.to(torch.float64 if dtype == torch.float64 else torch.float32).double().numpy()
    if got is None:
        has_match = ((q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] != g_cams[None, :])).any()
        assert not (is_tame(dist) and bool(has_match))
        return
    expected = eval_numpy.evaluate_rank_numpy(
        ranked, q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy(), min(max_rank, g)
    )
    np.testing.assert_array_equal(got.cmc, expected["cmc"])
    assert got.mAP == pytest.approx(expected["mAP"], rel=1e-12)
    assert got.mINP == pytest.approx(expected["mINP"], rel=1e-12)


def _distinct_rows(pooled: np.ndarray) -> bool:
    """No exact ties in any row: the one place where the reference and dpm_ops may legitimately differ."""
    return all(len(np.unique(row)) == len(row) for row in pooled)


@MANY
@given(
    data=st.data(),
    q=sizes(),
    g=sizes(),
    dtype=dtypes(),
    squared=st.booleans(),
    k1=st.integers(1, 4),
    k2=st.integers(1, 3),
)
def test_re_ranking(data, q, g, dtype, squared, k1, k2):
    q_g, q_q, g_g = (
        data.draw(tensors(shape, dtype, positive=True, poison_rate=10), label=name)
        for name, shape in (("q_g", (q, g)), ("q_q", (q, q)), ("g_g", (g, g)))
    )
    if data.draw(st.booleans(), label="negative") and q * g:
        q_g = q_g.clone()
        q_g[0, 0] = -q_g[0, 0] - 1
    input_kind = "squared" if squared else "euclidean"
    got = outcome(lambda: re_ranking(q_g, q_q, g_g, k1, k2, 0.3, input=input_kind))
    if got is None:
        float16_squares_fit = (
            squared
            or dtype != torch.float16
            or all(float(m.abs().amax()) < 255.9 for m in (q_g, q_q, g_g) if m.numel())
        )
        # the squares must not all be subnormal in the dtype they are taken in (the float32 pipeline, float16's)
        squares = torch.float16 if dtype == torch.float16 and not squared else torch.float32
        floor = torch.finfo(squares).tiny ** (1 if squared else 0.5)
        peak = max((float(m.abs().amax()) for m in (q_g, q_q, g_g) if m.numel()), default=0.0)
        tame = is_tame(q_g, q_q, g_g) and q * g and float16_squares_fit and (peak == 0 or peak >= floor)
        assert not (tame and (not squared or float(q_g.min()) >= 0))
        return
    assert bool(torch.isfinite(got).all())
    # numpy as the reference gets it: float16 stays float16 (squared in float16), bfloat16 (no numpy dtype) float32
    mats = [(m if dtype in (torch.float16, torch.float64) else m.float()).numpy() for m in (q_g, q_q, g_g)]
    pooled = np.block([[mats[1], mats[0]], [mats[0].T, mats[2]]]).T  # item i reads column i
    if _distinct_rows(pooled):
        with np.errstate(all="ignore"):
            expected = rerank_numpy.re_ranking(*mats, k1, k2, 0.3, input=input_kind)
        if np.isfinite(expected).all():  # the reference's 0 / 0 on an all-zero row (squares underflow) is NaN
            np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


def _ranked_apart_in_float32(features: torch.Tensor, distances: np.ndarray) -> bool:
    """Every row's squared distances lie further apart than their float32 rounding can move them:
    1e-5 (|x|^2 + |y|^2) of the larger pair, well above the error of |x|^2 + |y|^2 - 2 x.y summed in
    float32 (as dpm_ops does) or of a float32 Euclidean distance squared (as the reference does). Where
    rows of very different scale meet (features of 1 and 1e10), float32 ties, not the method, order a
    row, and the two may legitimately rank it differently. `distances`: the features' float64 cdist."""
    squared_norms = (features * features).sum(1)
    squared = torch.from_numpy(distances) ** 2
    for row in range(len(features)):
        values, order = squared[row].sort()
        scale = squared_norms[row] + squared_norms[order]
        if bool((values.diff() <= 1e-5 * torch.maximum(scale[1:], scale[:-1])).any()):
            return False
    return True


@FEW
@given(data=st.data(), q=sizes(), g=sizes(), d=sizes(), dtype=dtypes(), k1=st.integers(1, 4), k2=st.integers(1, 3))
def test_rerank_features(data, q, g, d, dtype, k1, k2):
    qf, gf = (data.draw(tensors(shape, dtype), label=name) for name, shape in (("qf", (q, d)), ("gf", (g, d))))
    got = outcome(lambda: rerank_features(qf, gf, k1, k2, 0.3))
    if got is None:
        assert not (is_tame(qf, gf) and q * g * d) or too_small(torch.float32, qf, gf)
        return
    assert bool(torch.isfinite(got).all())
    features = torch.cat([qf, gf]).double()
    pooled = torch.cdist(features, features).numpy()
    assume(float(pooled.max()) > 1e-3 * max(largest(features), 1e-300) and _distinct_rows(pooled.round(4)))
    assume(_ranked_apart_in_float32(features, pooled))
    expected = rerank_numpy.re_ranking_from_features(qf.double().numpy(), gf.double().numpy(), k1, k2, 0.3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-4)


def too_small(arithmetic, *ts) -> bool:
    """Inputs of Euclidean distances all below row_norm_floor (not all 0): refused, their squares underflow."""
    return 0 < max(float(t.double().abs().max()) for t in ts if t.numel()) < row_norm_floor(arithmetic)


@FEW
@given(
    data=st.data(),
    m=sizes(),
    n=sizes(),
    d=sizes(),
    dtype=dtypes(),
    metric=st.sampled_from(["euclidean", "sqeuclidean", "cosine"]),
)
def test_pairwise_distance(data, m, n, d, dtype, metric):
    x, y = (data.draw(tensors(shape, dtype), label=name) for name, shape in (("x", (m, d)), ("y", (n, d))))
    got = outcome(lambda: pairwise_distance(x, y, metric))
    if got is None:
        assert not (is_tame(x, y) and m * n * d) or (metric != "cosine" and too_small(compute_dtype(x, y), x, y))
        return
    xd, yd = x.double(), y.double()
    if metric == "cosine":
        truth = 1 - torch.nn.functional.normalize(xd, dim=1) @ torch.nn.functional.normalize(yd, dim=1).T
        magnitude = 1.0
    else:
        truth = torch.cdist(xd, yd) ** (2 if metric == "sqeuclidean" else 1)
        scale = max(largest(x), largest(y))
        # |x|^2 + |y|^2 - 2 x.y: ~eps |x|^2 in the square, ~sqrt(eps) |x| after the root
        magnitude = 10 * scale**2 if metric == "sqeuclidean" else 1e3 * scale
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(got, truth, compute, magnitude=magnitude)
