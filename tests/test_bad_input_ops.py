"""Bad input into the ops and the evaluation API (issue 9, "Ops and evaluation"): each cause gets a
ValueError naming the argument, on every backend, or a defined correct answer; never a crash, a
torch TypeError / IndexError or a silently wrong number."""

import fractions
import functools
import math
import warnings

import numpy as np
import pytest
import torch

import dpm_ops
from dpm_ops.evaluation import evaluate_rank, jaccard_distance, pairwise_distance, re_ranking, rerank_features
from dpm_ops.losses import batch_hard_soft_margin_triplet, masked_arcface_cross_entropy
from dpm_ops.ops import (
    batch_hard_triplet,
    hem_loss,
    hierarchical_mask_pool,
    hierarchical_mask_pool_reference,
    masked_arccos_distance,
    masked_arcface_ce,
    masked_cosine,
    maskreid_ranking_loss,
    self_knn,
)
from tests.conftest import backend_params, device_for, op_for

ALL = backend_params("reference", "cpp", "triton")
FUSED = backend_params("cpp", "triton")  # ops whose reference is the loss module's backend="reference" path
NAN, INF = float("nan"), float("inf")
needs_cpp = pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="needs the C++ extension")


def poisoned(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def labels4():
    return torch.tensor([0, 0, 1, 1])


_GEN = torch.Generator().manual_seed(0)
ARCFACE_INPUTS = (
    torch.randn(4, 6, generator=_GEN),
    torch.rand(4, 6, generator=_GEN),
    torch.randn(3, 6, generator=_GEN),
    torch.tensor([0, 1, 2, 0]),
)


# One call per op, with its float inputs by name: every one gets the same NaN / inf check, and the
# same magnitude check (rows whose norm passes sqrt(float max) / 2 would overflow their squares).
def cosine_call(backend, x, mask, protos):
    return masked_cosine(x, mask, protos, backend=backend)


def arccos_call(backend, q, q_mask, g):
    return masked_arccos_distance(q, q_mask, g, backend=backend)


OP_CALLS = {
    "masked_cosine": (
        ALL,
        cosine_call,
        lambda: dict(x=torch.randn(4, 6), mask=torch.rand(4, 6), protos=torch.randn(3, 6)),
    ),
    "masked_arccos_distance": (
        ALL,
        arccos_call,
        lambda: dict(q=torch.randn(4, 6), q_mask=torch.rand(4, 6), g=torch.randn(3, 6)),
    ),
    "masked_arcface_ce": (
        FUSED,
        lambda b, features, mask, weight: masked_arcface_ce(
            features, mask, weight, torch.tensor([0, 1, 2, 0]), backend=b
        ),
        lambda: dict(features=torch.randn(4, 6), mask=torch.rand(4, 6), weight=torch.randn(3, 6)),
    ),
    "batch_hard_triplet": (
        FUSED,
        lambda b, features: batch_hard_triplet(features, labels4(), backend=b),
        lambda: dict(features=torch.randn(4, 6)),
    ),
    "hem_loss": (
        ALL,
        lambda b, cls_logits: hem_loss(cls_logits, backend=b),
        lambda: dict(cls_logits=torch.randn(2, 3, 5)),
    ),
    "maskreid_ranking_loss": (
        ALL,
        lambda b, embeddings: maskreid_ranking_loss(embeddings, labels4(), backend=b),
        lambda: dict(embeddings=torch.nn.functional.normalize(torch.randn(4, 6), dim=1)),
    ),
    "hierarchical_mask_pool max": (
        ALL,
        lambda b, features, mask: hierarchical_mask_pool([features], mask, "max", backend=b),
        lambda: dict(features=torch.randn(2, 3, 4, 4), mask=torch.rand(2, 1, 8, 8)),
    ),
    "hierarchical_mask_pool avg": (
        ALL,
        lambda b, features, mask: hierarchical_mask_pool([features], mask, "avg", backend=b),
        lambda: dict(features=torch.randn(2, 3, 4, 4), mask=torch.rand(2, 1, 8, 8)),
    ),
}
OP_CASES = [
    pytest.param(op, backend.values[0], marks=backend.marks, id=f"{op}-{backend.values[0]}")
    for op, (backends, _, _) in OP_CALLS.items()
    for backend in backends
]
MESSAGE_NAME = {"features": "features(\\[0\\])?"}


@pytest.mark.parametrize("op, backend", OP_CASES)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_input_is_a_value_error(op, backend, value):
    """Before: the triplet loss gave 0.6931 for NaN features, a NaN mask in max mode pooled to finite
    values on C++ and 0 on the reference, HEM and the ranking loss returned NaN."""
    _, call, make = OP_CALLS[op]
    for name in make():
        inputs = make()
        inputs[name] = poisoned(inputs[name], value)
        with pytest.raises(ValueError, match=f"{MESSAGE_NAME.get(name, name)} contains non-finite values"):
            call(backend, **inputs)


@pytest.mark.parametrize("op, backend", OP_CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_input_is_a_value_error(op, backend, dtype):
    """Before: masked_arccos_distance checked values before dtypes, so these were a RuntimeError from
    vector_norm. (hierarchical_mask_pool's mask may be bool or integer: a weight, not a feature.)"""
    _, call, make = OP_CALLS[op]
    for name in make():
        if dtype != torch.complex64 and "pool" in op and name == "mask":
            continue
        inputs = make()
        inputs[name] = torch.ones(inputs[name].shape, dtype=dtype)
        with pytest.raises(ValueError, match=rf"\b{MESSAGE_NAME.get(name, name)}(?!\w)"):  # the name as a word
            call(backend, **inputs)


def _within_float32(op, backend):
    # hierarchical_mask_pool's kernels sum in fp64: their average of maps near float32's largest values is in range
    return "pool avg" in op and backend != "reference"


@pytest.mark.parametrize(
    "op, backend", [case for case in OP_CASES if "max" not in case.values[0] and not _within_float32(*case.values)]
)
def test_finite_input_too_large_for_float32_is_a_value_error(op, backend):
    """Before: masked_cosine of magnitude-1e19 features and prototypes was an all-zero matrix."""
    _, call, make = OP_CALLS[op]
    name = next(iter(make()))
    inputs = make()
    inputs[name] = inputs[name].sign() * 3e38 if "pool" in op else inputs[name].sign() * 1e19
    with pytest.raises(ValueError, match=f"{MESSAGE_NAME.get(name, name)} is too large in magnitude"):
        call(backend, **inputs)


@pytest.mark.parametrize("op, backend", [case for case in OP_CASES if _within_float32(*case.values)])
def test_pooled_average_of_maps_near_the_float32_limit_is_exact(op, backend):
    """The reference's fp32 sums overflow (the test above); the kernels' fp64 sums give the average."""
    _, call, make = OP_CALLS[op]
    inputs = make()
    inputs["features"] = inputs["features"].sign() * 3e38
    expected = hierarchical_mask_pool_reference([inputs["features"].double()], inputs["mask"].double(), "avg")
    torch.testing.assert_close(call(backend, **inputs).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ALL)
def test_masked_cosine_at_the_magnitude_limit_is_exact(backend):
    """Just inside the limit the answer is the scale-invariant cosine, not a rejection."""
    x, mask, protos = (
        torch.randn(4, 6, dtype=torch.float64),
        torch.rand(4, 6, dtype=torch.float64),
        torch.randn(3, 6, dtype=torch.float64),
    )
    expected = masked_cosine(x, mask, protos, backend="reference")
    scale = 1e18 / x.norm(dim=1).max()
    got = masked_cosine((x * scale).float(), (mask * scale).float(), (protos * scale).float(), backend=backend)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(
        ValueError, match="x is too large in magnitude: row norms must stay below 9.22e\\+18 in float32"
    ):
        masked_cosine(x.float() * 1e19, mask.float(), protos.float(), backend=backend)


@pytest.mark.parametrize(
    "loss, kwargs",
    [
        (batch_hard_soft_margin_triplet, {}),
        (masked_arcface_cross_entropy, dict(mask=torch.rand(4, 6), weight=torch.randn(3, 6))),
    ],
)
def test_reference_losses_check_like_the_fused_ops(loss, kwargs):
    features = poisoned(torch.randn(4, 6), NAN)
    labels = torch.tensor([0, 0, 1, 2]) if kwargs else labels4()
    with pytest.raises(ValueError, match="features contains non-finite values"):
        loss(features, labels=labels, backend="reference", **kwargs)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize(
    "name, value",
    [
        ("scale", NAN),
        ("margin", INF),
        ("plain_weight", "a"),
        ("clamp_eps", None),
        ("masked_weight", -INF),
        ("scale", -30.0),  # scale and the weights were taken with any sign
        ("scale", 0),
        ("masked_weight", -5.0),
    ],
)
def test_arcface_numbers(backend, name, value):
    args = torch.randn(4, 6), torch.rand(4, 6), torch.randn(3, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        masked_arcface_cross_entropy(*args, backend=backend, **{name: value})


def test_unfused_arcface_label_out_of_range():
    """Before: an IndexError from gather (label >= K) or a NaN loss."""
    args = torch.randn(4, 6), torch.rand(4, 6), torch.randn(3, 6)
    for labels in (torch.tensor([0, 1, 3, 0]), torch.tensor([0, -1, 2, 0])):
        with pytest.raises(ValueError, match="labels must lie in \\[0, K = 3\\)"):
            masked_arcface_cross_entropy(*args, labels, backend="reference")


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda v: masked_cosine(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), eps=v), "eps"),
        (lambda v: hem_loss(torch.ones(2, 3, 4), eps=v), "eps"),
        (lambda v: maskreid_ranking_loss(torch.ones(4, 3), labels4(), alpha=v), "alpha"),
        (lambda v: maskreid_ranking_loss(torch.ones(4, 3), labels4(), lam=v), "lam"),
    ],
)
@pytest.mark.parametrize("value", ["a", None, NAN, INF, True])
def test_numbers_of_the_wrong_kind(call, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        call(value)


@pytest.mark.parametrize(
    "call, value",
    [
        (lambda v, b: masked_cosine(torch.randn(2, 3), torch.rand(2, 3), torch.randn(4, 3), eps=v, backend=b), 1e-6),
        (lambda v, b: masked_arcface_ce(*ARCFACE_INPUTS, scale=30 * v, backend=b), 1),
        (lambda v, b: maskreid_ranking_loss(torch.eye(4, 3), labels4(), alpha=v, backend=b), 0.15),
        (lambda v, b: maskreid_ranking_loss(torch.eye(4, 3), labels4(), lam=v, backend=b), 2),
    ],
)
@pytest.mark.parametrize("backend", ALL)
def test_numbers_of_other_real_types(call, value, backend):
    """The checks take any numbers.Real; the reference was given it as it came: a fractions.Fraction was a TypeError
    there (clamp_min's, a Tensor's operator), numpy's scalars stayed numpy's."""
    torch.manual_seed(0)
    expected = call(value, "reference")
    for number in (fractions.Fraction(value), np.float32(value)):
        torch.manual_seed(0)
        torch.testing.assert_close(call(number, backend), expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda v: masked_cosine(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), eps=v),
        lambda v: hem_loss(torch.ones(2, 3, 4), eps=v),
    ],
)
@pytest.mark.parametrize("value", [0.0, -1e-6])
def test_eps_must_be_positive(call, value):
    # eps is a divisor's floor: 0 lets 0 / 0 through
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        call(value)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype, least", [(torch.float32, "1.17549e-38"), (torch.float64, "2.22507e-308")])
def test_eps_must_be_a_normal_number_of_the_compute_dtype(backend, dtype, least):
    """Before, a subnormal eps (1e-40 in float32) was taken, flushed to 0 by the C++ kernels: a row of zeros or of
    tiny values gave NaN where the reference gave a number. At the least eps taken, kernels and reference agree."""
    device = device_for(backend)
    x, mask, protos = torch.randn(4, 6, dtype=dtype), torch.rand(4, 6, dtype=dtype), torch.randn(3, 6, dtype=dtype)
    x[1], x[2] = 0, x[2] * 1e-25
    logits = torch.randn(2, 3, 6, dtype=dtype)
    logits[0, 1], logits[1, 2] = logits[0, 1] * 1e-25, 0
    x, mask, protos, logits = (t.to(device) for t in (x, mask, protos, logits))
    cosine = functools.partial(masked_cosine, x, mask, protos)
    hem = functools.partial(hem_loss, logits)
    # masked_cosine's eps floors norms computed from their squares: at least the square root (below it a tiny row's
    # norm underflowed to 0 and the smaller eps took its place: cosines of -4e4)
    sqrt_least = f"{math.sqrt(torch.finfo(dtype).tiny):.6g}"
    for call, op, floor in ((cosine, "masked_cosine", True), (hem, "hem_loss", False)):
        message = f"{sqrt_least}, the square root of the smallest normal" if floor else f"{least}, the smallest normal"
        with pytest.raises(ValueError, match=f"^{op}: eps must be finite and >= {message}"):
            call(eps=(math.sqrt(torch.finfo(dtype).tiny) if floor else torch.finfo(dtype).tiny) / 4, backend=backend)
        at_least = dict(eps=math.sqrt(torch.finfo(dtype).tiny) if floor else torch.finfo(dtype).tiny)
        got, expected = call(**at_least, backend=backend), call(**at_least, backend="reference")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("labels", [list("abcdef"), [object()] * 6, None, [[1], [2, 3]]])
def test_evaluate_rank_labels_of_the_wrong_kind(labels):
    """Before: a torch / numpy TypeError."""
    dist = np.random.default_rng(0).random((6, 8))
    with pytest.raises(ValueError, match="q_pids must"):
        evaluate_rank(dist, labels, np.arange(8) % 3, np.zeros(6, int), np.ones(8, int))


@pytest.mark.parametrize("value", [[["a", "b"]], [[None, 1.0]], None])
def test_pairwise_distance_values_of_the_wrong_kind(value):
    with pytest.raises(ValueError, match="x must"):
        pairwise_distance(value, np.ones((3, 2)))


META = torch.empty(6, 8, device="meta")


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: evaluate_rank(META, np.arange(6), np.arange(8), np.zeros(6), np.ones(8)), "distmat"),
        (lambda: re_ranking(META, torch.zeros(6, 6), torch.zeros(8, 8)), "q_g_dist"),
        (lambda: re_ranking(torch.zeros(6, 8), torch.zeros(6, 6), torch.empty(8, 8, device="meta")), "g_g_dist"),
        (lambda: rerank_features(META, torch.zeros(3, 8)), "qf"),
        (lambda: pairwise_distance(torch.zeros(3, 8), META), "y"),
    ],
)
def test_meta_tensors(call, name):
    """Before: NotImplementedError from a data access on a meta tensor."""
    with pytest.raises(ValueError, match=f"{name} is a meta tensor"):
        call()


def _meta(*shape):
    return torch.empty(*shape, device="meta")


META_LABELS = torch.zeros(3, dtype=torch.long, device="meta")


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: masked_cosine(_meta(3, 4), _meta(3, 4), _meta(2, 4), backend=b), "masked_cosine: x"),
        (lambda b: batch_hard_triplet(_meta(3, 4), META_LABELS, backend=b), "batch_hard_triplet: features"),
        (lambda b: hem_loss(_meta(2, 3, 4), backend=b), "hem_loss: cls_logits"),
        (lambda b: hierarchical_mask_pool([_meta(2, 3, 4, 4)], None, "max", backend=b), "features\\[0\\]"),
        (lambda b: hierarchical_mask_pool([_meta(2, 3, 4, 4)], None, "avg", backend=b), "features\\[0\\]"),
        (
            lambda b: masked_arcface_ce(_meta(3, 4), _meta(3, 4), _meta(5, 4), META_LABELS, backend=b),
            "masked_arcface_cross_entropy: features",
        ),
        (lambda b: maskreid_ranking_loss(_meta(3, 4), META_LABELS, backend=b), "maskreid_ranking_loss: embeddings"),
    ],
)
def test_ops_refuse_meta_tensors(call, message, backend):
    """Before: RuntimeError from .item() (or a meta result from the C++ masked cosine, whose checks run
    inside its kernel)."""
    with pytest.raises(ValueError, match=f"{message} is a meta tensor"):
        call(backend)


def test_re_ranking_rows_whose_largest_distance_is_zero():
    """Before: all-NaN (0 / 0 in the row normalisation). Such a row keeps its zero distances, which
    gives what a constant row gives, shifted by lambda * the constant."""
    q, g, lam = 3, 5, 0.3
    zeros = re_ranking(np.zeros((q, g)), np.zeros((q, q)), np.zeros((g, g)), k1=2, k2=2, lambda_value=lam)
    ones = re_ranking(np.ones((q, g)), np.ones((q, q)), np.ones((g, g)), k1=2, k2=2, lambda_value=lam)
    np.testing.assert_allclose(zeros, ones - lam, atol=1e-6)
    identical = rerank_features(np.ones((q, 4)), np.ones((g, 4)), k1=2, k2=2, lambda_value=lam)
    np.testing.assert_allclose(identical, zeros, atol=1e-6)


@pytest.mark.parametrize("name", ["q_g_dist", "q_q_dist", "g_g_dist"])
def test_re_ranking_negative_squared_distances(name):
    """Before: all-NaN for a negative input="squared" matrix."""
    mats = dict(q_g_dist=np.ones((3, 5)), q_q_dist=np.ones((3, 3)), g_g_dist=np.ones((5, 5)))
    mats[name] = mats[name].copy()
    mats[name][0, 1] = -0.5
    with pytest.raises(ValueError, match=f"{name} must hold squared distances >= 0"):
        re_ranking(**mats, input="squared")
    assert np.isfinite(re_ranking(**mats)).all()  # Euclidean input is squared: the reference's rule


def test_re_ranking_and_features_too_large_for_float32():
    """The pipeline is float32 whatever the input dtype: distances it would square past float32's
    range, or features whose squared distances would, are rejected instead of giving NaN."""
    with pytest.raises(ValueError, match="q_g_dist is too large in magnitude"):
        re_ranking(np.full((2, 3), 1e20), np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(
        ValueError, match="g_g_dist is too large in magnitude"
    ):  # Euclidean input: squared, sign and all
        re_ranking(np.ones((2, 3)), np.zeros((2, 2)), np.full((3, 3), -1e20))
    with pytest.raises(
        ValueError, match="gf is too large in magnitude: row norms must stay below 9.22e\\+18 in float32"
    ):
        rerank_features(np.ones((2, 3)), np.full((3, 3), 1e30))
    with pytest.raises(ValueError, match="x is too large in magnitude"):
        pairwise_distance(np.full((2, 3), 1e19, dtype=np.float32), np.ones((3, 3), dtype=np.float32))


def test_features_too_small_for_float32_distances():
    """Before: rerank_features of features scaled by 1e-25 returned all zeros (by 1e-22, values off by 0.125;
    the result does not depend on the scale), pairwise_distance all zeros."""
    tiny = np.full((3, 3), 1e-25)
    with pytest.raises(ValueError, match="rerank_features: qf and gf are too small in magnitude for Euclidean"):
        rerank_features(tiny[:2], tiny)
    assert np.isfinite(rerank_features(np.ones((2, 3)), tiny)).all()  # mixed scales are taken
    with pytest.raises(ValueError, match="jaccard_distance: features is too small in magnitude"):
        jaccard_distance(tiny, 2, 1)
    with pytest.raises(ValueError, match="pairwise_distance: x and y are too small in magnitude .* float32"):
        pairwise_distance(tiny.astype(np.float32), tiny.astype(np.float32))
    cosine = pairwise_distance(tiny, np.ones((3, 3)), "cosine")  # F.normalize's eps rule: ~0 cosines, defined
    np.testing.assert_allclose(cosine, np.ones((3, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(pairwise_distance(tiny, 2 * tiny), np.full((3, 3), np.sqrt(3) * 1e-25))  # float64
    assert np.array_equal(pairwise_distance(np.zeros((2, 3)), np.zeros((3, 3))), np.zeros((2, 3)))


def test_evaluate_rank_huge_max_rank_is_bounded_by_the_gallery():
    dist = np.random.default_rng(1).random((6, 20))
    args = np.arange(6) % 3, np.arange(20) % 3, np.zeros(6, int), np.ones(20, int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        huge = evaluate_rank(dist, *args, max_rank=10**9)
    np.testing.assert_array_equal(huge.cmc, evaluate_rank(dist, *args, max_rank=20).cmc)


# The k-reciprocal kernels are reachable as torch.ops.dpm_ops.*: every index argument is range-checked.
def _neighbours(n=6, width=4):
    return torch.stack([torch.roll(torch.arange(n), -i)[:width] for i in range(n)])


def _csr(n=6):
    return torch.ops.dpm_ops.kreciprocal_expand(_neighbours(n), 3, 2)


@needs_cpp
@pytest.mark.parametrize("bad", [-1, 6, 2**40])
def test_kreciprocal_expand_index_range(bad):
    neighbours = _neighbours()
    neighbours[2, 1] = bad
    with pytest.raises(ValueError, match="neighbours must hold indices in \\[0, 6\\)"):
        torch.ops.dpm_ops.kreciprocal_expand(neighbours, 3, 2)


@needs_cpp
@pytest.mark.parametrize("what", ["cand_indices", "cols", "row_ptr_end", "row_ptr_order", "cand_shape"])
def test_kreciprocal_pair_sqdist_index_range(what):
    row_ptr, cols = _csr()
    features, cand_values, cand_indices = torch.randn(6, 3), torch.rand(6, 4), _neighbours()
    message = {
        "cand_indices": "cand_indices must hold indices",
        "cols": "cols must hold indices",
        "row_ptr_end": "row_ptr must start at 0",
        "row_ptr_order": "row_ptr must start at 0",
        "cand_shape": "cand_values and cand_indices must both be",
    }[what]
    if what == "cand_indices":
        cand_indices = cand_indices.clone()
        cand_indices[0, 0] = 99
    elif what == "cols":
        cols = cols.clone()
        cols[-1] = 6
    elif what == "row_ptr_end":
        row_ptr = row_ptr.clone()
        row_ptr[-1] += 100
    elif what == "row_ptr_order":
        row_ptr = row_ptr.clone()
        row_ptr[2] = row_ptr[3] + 1  # [0, 2, 7, 6, ...]: decreasing
    else:
        cand_values = cand_values[:3]
    with pytest.raises(ValueError, match=message):
        torch.ops.dpm_ops.kreciprocal_pair_sqdist(features, cand_values, cand_indices, row_ptr, cols)


@needs_cpp
def test_kreciprocal_query_expansion_and_jaccard_index_range():
    row_ptr, cols = _csr()
    values = torch.rand(len(cols))
    sources = _neighbours()[:, :2].clone()
    sources[1, 1] = -3
    with pytest.raises(ValueError, match="sources must hold indices in \\[0, 6\\)"):
        torch.ops.dpm_ops.kreciprocal_query_expansion(row_ptr, cols, values, sources)
    with pytest.raises(ValueError, match="values must be 1-D with"):
        torch.ops.dpm_ops.kreciprocal_query_expansion(row_ptr, cols, values[:-1], _neighbours()[:, :2])
    bad_cols = cols.clone()
    bad_cols[0] = 1 << 50
    with pytest.raises(ValueError, match="cols must hold indices in \\[0, 6\\)"):
        torch.ops.dpm_ops.kreciprocal_jaccard_blend_(torch.zeros(2, 4), row_ptr, bad_cols, values, 0.3)
    short = row_ptr.clone()
    short[3] = short[4] + 5
    with pytest.raises(ValueError, match="row_ptr must start at 0, never decrease"):
        torch.ops.dpm_ops.kreciprocal_jaccard_blend_(torch.zeros(2, 4), short, cols, values, 0.3)
    out = torch.zeros(2, 4)
    torch.ops.dpm_ops.kreciprocal_jaccard_blend_(out, row_ptr, cols, values, 0.3)  # the valid call still runs
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", [pytest.param("reference"), *backend_params("cpp", "triton")])
def test_hierarchical_mask_pool_refuses_negative_mask_weights(backend):
    """Before: max mode pooled the cells of weight > 0 on cpp and 0 (a negative total) elsewhere."""
    mask = -torch.ones(1, 1, 4, 4)
    mask[0, 0, 1, 1] = 2.0
    with pytest.raises(
        ValueError, match="hierarchical_mask_pool: mask must be >= 0 \\(weights\\), got a minimum of -1"
    ):
        hierarchical_mask_pool([torch.randn(1, 3, 4, 4)], mask, "max", backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_self_knn_normalize_is_a_flag(backend):
    """Before: normalize="no" (any truthy value) ran the normalised order."""
    x = torch.randn(6, 3)
    for value in ("no", 1, None):
        with pytest.raises(ValueError, match=f"^self_knn: normalize must be True or False, got {value!r}$"):
            self_knn(x, 2, normalize=value, backend=backend)
    for got, expected in zip(
        self_knn(x, 2, normalize=np.bool_(True), backend=backend), self_knn(x, 2, normalize=True, backend=backend)
    ):
        torch.testing.assert_close(got, expected)


def test_gpu_k_cap_and_nonnegative_weights_at_their_edges():
    from dpm_ops.ops._checks import KNN_GPU_MAX_K, check_knn_gpu_k, check_nonnegative

    check_knn_gpu_k(KNN_GPU_MAX_K, "Triton")  # the cap itself fits the kernels' lists
    with pytest.raises(
        ValueError, match=rf"knn: the Triton kernel takes k <= {KNN_GPU_MAX_K}, got {KNN_GPU_MAX_K + 1}"
    ):
        check_knn_gpu_k(KNN_GPU_MAX_K + 1, "Triton")
    check_nonnegative("op", weights=torch.empty(0, 3), other=torch.zeros(2))  # nothing negative, nothing to reduce
    with pytest.raises(ValueError, match=r"op: other must be >= 0 \(weights\), got a minimum of -0\.5"):
        check_nonnegative("op", weights=torch.empty(0), other=torch.tensor([1.0, -0.5]))


FLOAT, DOUBLE = "(Float|torch.float32)", "(Double|torch.float64)"  # a dtype as C++ and Python name it


def _backward_cases(device):
    x, mask, protos = (torch.randn(*shape, device=device) for shape in ((4, 8), (4, 8), (5, 8)))
    out = torch.randn(4, 5, device=device)
    features, pool_out = [torch.randn(2, 3, 4, 4, device=device)], torch.randn(2, 3, device=device)
    logits, embeddings, coef = torch.randn(2, 3, 6, device=device), torch.randn(4, 8, device=device), torch.randn(4, 4)
    cosine = ("masked_cosine_backward", lambda grad, out=out, den=None: (grad, x, mask, protos, out, den, 1e-12))
    pool = ("hierarchical_mask_pool_backward", lambda grad, out=pool_out: (grad, features, None, out, "max"))
    return [
        (*cosine, dict(grad=out[:3]), "grad must have the forward's shape \\[4, 5\\], got \\[3, 5\\]"),
        (*cosine, dict(grad=out.double()), f"grad must be {FLOAT} as the forward gives it, got {DOUBLE}"),
        (*cosine, dict(grad=out, out=out[:2, :2]), "out must have the forward's shape"),
        (*cosine, dict(grad=out, den=out.double()), f"den_sq must be {FLOAT} as the forward gives it"),
        (*pool, dict(grad=pool_out[:1]), "grad must have the forward's shape \\[2, 3\\], got \\[1, 3\\]"),
        (*pool, dict(grad=pool_out.double()), f"grad must be {FLOAT}"),
        (*pool, dict(grad=pool_out, out=pool_out.T), "out must have the forward's shape"),
        (
            "hem_loss_backward",
            lambda grad: (grad, logits, 1e-6, "sum"),
            dict(grad=torch.ones(3)),
            "grad must be the loss.s gradient",
        ),
        (
            "maskreid_ranking_loss_backward",
            lambda grad: (grad, embeddings, coef),
            dict(grad=torch.ones(3)),
            "grad must be the",
        ),
    ]


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
@pytest.mark.parametrize("case", range(9))
def test_backward_ops_check_what_the_forward_gives(backend, case):
    """A direct torch.ops call of a backward op with a gradient or saved tensor of another shape or dtype than the
    forward gives: before, the kernels read a mis-shaped grad past its end (CPU) and overran a buffer with a
    float64 one (CUDA, a crash under the emulator); now a ValueError naming it, from the Triton twins too."""
    name, arguments, given, message = _backward_cases(device_for(backend))[case]
    with pytest.raises(ValueError, match=f"{name}: {message}"):
        op_for(name, backend)(*arguments(**given))


def _raw_op_cases(device):
    """(op, its arguments, what the message says) for direct torch.ops calls that the ops must refuse."""
    x, lg = torch.randn(5, 4, device=device), torch.randn(2, 3, 6, device=device)
    labels = torch.tensor([0, 0, 1, 1, 2], device=device)
    features, arcface = [torch.randn(2, 3, 4, 4, device=device)], (30.0, 0.5, False, 1e-7, 0.5, 0.5, False)
    return [
        ("knn", (x, x, 6, "euclidean"), r"knn: k must"),
        ("knn", (x, x[:, :3], 2, "euclidean"), "knn: x and y must have the same feature dimension"),
        ("knn", (x, x, 2, "cityblock"), "knn: metric must be one of"),
        ("knn", (x, x.long(), 2, "euclidean"), "knn: y must be floating point"),
        ("self_knn", (x, 0, "sqeuclidean", False, 0), r"self_knn: k must"),
        ("self_knn", (x, 2, "sqeuclidean", False, 7), "self_knn: cross_rows must"),
        ("self_knn", (x, 2, "cityblock", False, 0), "self_knn: metric must be one of"),
        ("self_knn", (x.long(), 2, "sqeuclidean", False, 0), "self_knn: x must be floating point"),
        ("knn_certified", (x, x, 6, "euclidean"), r"knn: k must"),
        ("self_knn_certified", (x, 2, "sqeuclidean", True, 9), "self_knn: cross_rows must"),
        ("masked_cosine", (x, x[:3], x, 1e-12), "masked_cosine: mask must have the shape of x"),
        ("masked_cosine", (x, x, x[:, :3], 1e-12), "masked_cosine: protos must have C = 4 columns like x, got 3"),
        ("masked_cosine", (x, x, x, 0.0), "masked_cosine: eps must be"),
        (
            "masked_cosine",
            (x, x, x, 1e-40),
            "masked_cosine: eps must be finite and >= 1.0842e-19, the square root of the smallest normal",
        ),
        ("masked_cosine", (x, x.double(), x, 1e-12), "masked_cosine: x, mask and protos must share one dtype"),
        (
            "hierarchical_mask_pool",
            (features, torch.rand(3, 1, 4, 4, device=device), "avg"),
            r"hierarchical_mask_pool: mask must be \(B, 1, H, W\) with B = 2",
        ),
        (
            "hierarchical_mask_pool",
            (features, torch.rand(2, 1, 4, 4, device=device).double(), "avg"),
            "hierarchical_mask_pool: mask must share dtype and device with the features",
        ),
        ("hierarchical_mask_pool", (features, None, "min"), "hierarchical_mask_pool: mode must be"),
        ("hem_loss", (lg[0], 1e-6, "sum"), "hem_loss: cls_logits must be 3-D"),
        ("hem_loss", (lg, 1e-6, "max"), "hem_loss: reduction must be 'sum'"),
        ("hem_loss", (lg, 0.0, "sum"), "hem_loss: eps must be"),
        ("hem_loss", (lg, 1e-40, "sum"), "hem_loss: eps must be finite and >= 1.17549e-38, the smallest normal"),
        (
            "masked_arcface_ce",
            (x, x, x[:3], torch.tensor([0, 1, 2, 3, 0], device=device), *arcface),
            r"masked_arcface_cross_entropy: labels must lie in \[0, K = 3\)",
        ),
        ("masked_arcface_ce", (x, x, x[:3], labels[:3], *arcface), "masked_arcface_cross_entropy: labels must be 1-D"),
        (
            "masked_arcface_ce",
            (x, x, x[:3], labels, 30.0, 0.5, False, 1.5, 0.5, 0.5, False),
            r"masked_arcface_cross_entropy: clamp_eps must lie in \[0, 1\)",
        ),
        ("maskreid_ranking_loss", (x, labels[:3], 0.15, 2.0, "literal", "hardest"), "labels must be 1-D with B = 5"),
        ("maskreid_ranking_loss", (x, labels, 0.15, 2.0, "literal", "closest"), "maskreid_ranking_loss: pos_mode must"),
        ("maskreid_ranking_loss", (x, labels.float(), 0.15, 2.0, "literal", "hardest"), "labels must be integer"),
        (
            "maskreid_ranking_loss_backward",
            (torch.ones((), device=device), x, torch.randn(4, 4, device=device)),
            "maskreid_ranking_loss_backward: coef must",
        ),
        ("batch_hard_triplet", (x, labels.int(), False), "batch_hard_triplet: labels must be int64"),
        ("batch_hard_triplet", (x.half(), labels, False), "batch_hard_triplet: features must be float32 or float64"),
        ("batch_hard_triplet", (x, labels[:2], False), "batch_hard_triplet: labels must be 1-D of length B = 5"),
        # the checks the C++ ops lacked and their twins made (a NaN or a number, silently)
        ("hem_loss", (lg[:, :, :0], 1e-6, "sum"), "hem_loss: cls_logits must have at least one head and one patch"),
        ("hem_loss", (lg[:0], 1e-6, "mean"), r"hem_loss: cls_logits must hold at least one sample \(B >= 1\)"),
        ("batch_hard_triplet", (x[:0], labels[:0], False), "batch_hard_triplet: features must hold at least one"),
        (
            "masked_arcface_ce",
            (x[:0], x[:0], x[:3], labels[:0], *arcface),
            "masked_arcface_cross_entropy: features must hold at least one sample",
        ),
        (
            "masked_arcface_ce",
            (x, x, x[:3], labels, -30.0, 0.5, False, 1e-7, 0.5, 0.5, False),
            r"masked_arcface_cross_entropy: scale must be a finite number in \(0, 1e\+06\], got -30",
        ),
        (
            "masked_arcface_ce",
            (x, x, x[:3], labels, 30.0, 0.5, False, 1e-7, -0.5, 0.5, False),
            r"masked_arcface_cross_entropy: plain_weight must be a finite number in \[0, 1e\+06\], got -0.5",
        ),
        ("maskreid_ranking_loss", (x[:0], labels[:0], 0.15, 2.0, "literal", "hardest"), "embeddings must hold at"),
        (
            "maskreid_ranking_loss",
            (x, labels, 0.15, -2.0, "literal", "hardest"),
            r"maskreid_ranking_loss: lam must be a finite number in \[0, 1e\+06\], got -2",
        ),
    ]


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
@pytest.mark.parametrize("case", range(len(_raw_op_cases("cpu"))))
def test_raw_ops_check_their_arguments_on_every_kind(backend, case):
    """A direct torch.ops call of an op with arguments it cannot take is the same ValueError from the C++ op and
    from its Triton twin. Before, the twins checked nothing: knn_triton with k past the rows returned indices
    of no row, the Triton ArcFace rows of labels past K were NaN."""
    name, arguments, message = _raw_op_cases(device_for(backend))[case]
    with pytest.raises(ValueError, match=message):
        op_for(name, backend)(*arguments)


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_raw_knn_ops_compute_in_the_rows_compute_dtype(backend):
    """The C++ ops compute in the compute dtype of their rows; the Triton twins ran float16 and float64 rows in
    float16 (distances returned in float16 where the fake said float64) and failed on float16 alone."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g).half().to(device), torch.randn(9, 5, generator=g).double().to(device)
    values, indices = op_for("knn", backend)(x, y, 3, "euclidean")
    expected = torch.ops.dpm_ops.knn(x.cpu().double(), y.cpu(), 3, "euclidean")
    assert values.dtype == torch.float64 and torch.equal(indices.cpu(), expected[1])
    torch.testing.assert_close(values.cpu(), expected[0])
    for metric in ("euclidean", "cosine"):
        values, indices = op_for("knn", backend)(x, x, 3, metric)
        expected = torch.ops.dpm_ops.knn(x.cpu().float(), x.cpu().float(), 3, metric)
        assert values.dtype == torch.float32 and torch.equal(indices.cpu(), expected[1])
    values = op_for("self_knn", backend)(x, 3, "sqeuclidean", False, 0)[0]
    assert values.dtype == torch.float32
