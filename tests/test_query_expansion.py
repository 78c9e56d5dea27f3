"""Alpha query expansion (dpm_ops.evaluation.alpha_query_expansion) against the method written out densely;
fast-reid's own `aqe` is compared in test_compat.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpm_ops.evaluation import alpha_query_expansion
from dpm_ops.evaluation.query_expansion import check_aqe


def dense_aqe(qf, gf, k, alpha, times):
    """The method as written: the pooled N x N cosine similarity, each row's k largest (ties by index),
    new feature = mean over them of similarity^alpha x raw feature; float64 throughout."""
    features = torch.cat([qf, gf]).double()
    for _ in range(times):
        normed = F.normalize(features, dim=1)
        similarity = normed @ normed.T
        order = torch.from_numpy(
            np.lexsort((np.arange(len(features))[None].repeat(len(features), 0), -similarity.numpy()))
        )
        top = order[:, :k]
        weights = torch.gather(similarity, 1, top).pow(alpha)
        features = (features[top] * weights[..., None]).mean(dim=1)
    return features[: len(qf)], features[len(qf) :]


@pytest.mark.parametrize("k, alpha, times", [(5, 3.0, 1), (1, 3.0, 1), (3, 1.0, 2), (10, 0.0, 1), (4, 2.0, 3)])
def test_equals_the_dense_computation(k, alpha, times):
    generator = torch.Generator().manual_seed(k * 10 + times)
    centres = torch.randn(6, 24, generator=generator)  # re-ID-like: clusters, so neighbours are similar
    pooled = centres[torch.arange(60) % 6] + 0.3 * torch.randn(60, 24, generator=generator)
    qf, gf = pooled[:15], pooled[15:]
    got = alpha_query_expansion(qf, gf, k=k, alpha=alpha, times=times)
    want = dense_aqe(qf, gf, k, alpha, times)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    if k == 1:  # each item is its only neighbour, weight cos(x, x)^alpha: 1 within rounding
        torch.testing.assert_close(torch.cat(got), pooled)


def test_duplicates_take_the_lower_index_and_dtypes_and_containers_are_kept():
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    qf, gf = base[:2], torch.cat([base, base])  # every gallery row twice: exact ties, broken by index
    got = alpha_query_expansion(qf, gf, k=2, alpha=1.0)
    want = dense_aqe(qf, gf, 2, 1.0, 1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-7)
    as_numpy = alpha_query_expansion(qf.numpy(), gf.numpy(), k=2, alpha=1.0)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in as_numpy)
    np.testing.assert_array_equal(np.concatenate(as_numpy), torch.cat(got).numpy())
    mixed = alpha_query_expansion(qf, gf.double(), k=2, alpha=1.0)  # float64 anywhere: float64, as torch.cat
    assert all(m.dtype == torch.float64 for m in mixed)
    with_zero = torch.cat([qf, torch.zeros(1, 3)])  # similarity 0 to everything, itself included, as F.normalize's
    for g, w in zip(alpha_query_expansion(with_zero, gf, k=3), dense_aqe(with_zero, gf, 3, 3.0, 1), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-7)
    transposed = qf.T.contiguous().T  # the same values, column-major
    assert not transposed.is_contiguous()
    strided = alpha_query_expansion(transposed, gf, k=2, alpha=1.0)
    torch.testing.assert_close(torch.cat(strided), torch.cat(got), rtol=0, atol=0)


def test_bad_arguments_are_named():
    qf, gf = torch.randn(3, 4), torch.randn(5, 4)
    for kwargs, message in (
        (dict(qf=torch.randn(3, 5)), r"^qf and gf must have the same feature dimension, got 5 and 4$"),
        (dict(gf=torch.randn(0, 4)), r"^gf is empty"),
        (dict(qf=torch.full((3, 4), float("nan"))), r"^alpha_query_expansion: qf contains non-finite values"),
        (dict(gf=torch.full((5, 4), 1e30)), r"^alpha_query_expansion: gf is too large in magnitude"),
        (dict(k=9), r"^k must be an integer in \[1, 8\], got 9$"),
        (dict(times=-1), r"^times must be an integer in \[0, 10\] \(rounds, each a k-NN"),
        (dict(times=10**9), r"^times must be an integer in \[0, 10\]"),  # ran for days
        (dict(alpha=float("inf")), r"^alpha_query_expansion: alpha must be a finite number"),
        (
            dict(k=8, alpha=0.5, qf=torch.tensor([[1.0, 0, 0, 0]] * 3), gf=torch.tensor([[-1.0, 0, 0, 0]] * 5)),
            "non-finite",
        ),
    ):
        arguments = {"qf": qf, "gf": gf, **kwargs}
        with pytest.raises(ValueError, match=message):
            alpha_query_expansion(arguments.pop("qf"), arguments.pop("gf"), **arguments)
    assert [check_aqe(value) for value in (False, None, True)] == [None, None, dict(k=5, alpha=3.0, times=1)]
    assert check_aqe(dict(k=2)) == dict(k=2, alpha=3.0, times=1)
    # the engine's (config, dpm-reid rank) bounds: the config schema takes the same
    assert check_aqe(dict(k=256, times=10)) == dict(k=256, alpha=3.0, times=10)
    for settings, message in (
        (dict(times=10**9), r"^aqe times must be an integer in \[1, 10\] \(rounds, each a k-NN"),
        (dict(times=0), r"^aqe times must be an integer in \[1, 10\]"),
        (dict(k=257), r"^aqe k must be an integer in \[1, 256\] \(the GPU k-NN kernels' most\), got 257$"),
    ):
        with pytest.raises(ValueError, match=message):
            check_aqe(settings)
