"""dpm_ops.evaluation.jaccard_distance and the distance drop-ins of dpm_ops.compat against the real
fast-reid (fastreid.utils.compute_dist, with faiss-cpu's exact flat index: search_option=3) and
torchreid (reid/metrics/distance.py)."""

import numpy as np
import pytest
import torch

from benchmarks.reference import peers
from benchmarks.reference.synthetic_features import make_reid_features
from conftest import backend_params, device_for, record_kernels
from dpm_ops._backend import forced_backend
from dpm_ops.compat import fastreid as compat_fastreid
from dpm_ops.compat import torchreid as compat_torchreid
from dpm_ops.evaluation import jaccard_distance
from dpm_ops.evaluation._inputs import MAX_K
from test_rerank import tiles  # noqa: F401 (the fixture: shipped tiles and tiny ones)


def reid_features(num_ids=40, seed=0):
    """Clustered, L2-normalised re-ID-like features (about 8 images per identity), queries first."""
    sizes = dict(num_query=num_ids, num_gallery=7 * num_ids, num_ids=num_ids, num_distractors=0)
    features = make_reid_features(**sizes, dim=64, latent_dim=16, seed=seed)
    return torch.from_numpy(np.concatenate([features.query, features.gallery]))


def fastreid_jaccard(features, k1, k2):
    return peers.fastreid_compute_dist().compute_jaccard_distance(features, k1=k1, k2=k2, search_option=3)


@pytest.mark.parametrize("k1, k2", [(20, 6), (30, 6), (5, 1), (3, 9), (2, 2), (319, 6)])
def test_matches_fastreid_compute_jaccard_distance(tiles, k1, k2):  # noqa: F811
    # k2 > k1: their query expansion averages the k1 columns their search returned; (2, 2): the
    # smallest neighbourhoods; 319: all but one item
    features = reid_features()
    expected = fastreid_jaccard(features, k1, k2)
    result = jaccard_distance(features, k1, k2)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32 and result.shape == (320, 320)
    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=2e-6)
    assert float(result.min()) >= 0  # rounding's negatives (m a hair above 1) set to 0, as theirs
    # not a degenerate case: an item is at 0 from itself, and the distances spread
    assert float(result.diagonal().abs().max()) < 1e-5 and float(result.std()) > 0.01


def test_unnormalised_and_float64_features():
    # large squared distances: softmax's shift keeps the weights finite (exp(-d²) alone would be 0 / 0)
    features = 7.0 * reid_features(seed=1)
    expected = fastreid_jaccard(features, 20, 6)
    np.testing.assert_allclose(jaccard_distance(features, 20, 6).numpy(), expected, rtol=0, atol=2e-6)
    result = jaccard_distance(features.double().numpy(), 20, 6)  # numpy in, numpy out; float32 as theirs
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-6)


KRECIPROCAL_STAGES = {"kreciprocal_expand", "kreciprocal_pair_sqdist", "kreciprocal_query_expansion"}
KRECIPROCAL_STAGES |= {"kreciprocal_jaccard_blend_"}


def test_kernel_and_torch_stages_agree(tiles, monkeypatch):  # noqa: F811
    # the C++ stages (csrc/kreciprocal) and their torch versions (builds without the extension);
    # "tiny tiles" forces the reference backend, which only the second call may run
    monkeypatch.delenv("DPM_OPS_BACKEND", raising=False)
    features = reid_features(seed=2)
    ran = record_kernels(monkeypatch)
    expected = jaccard_distance(features, 20, 6)
    assert {name for name, backend in ran if backend == "cpp"} >= KRECIPROCAL_STAGES  # every stage's kernel ran
    ran.clear()
    with forced_backend("reference"):
        np.testing.assert_allclose(jaccard_distance(features, 20, 6).numpy(), expected.numpy(), rtol=0, atol=1e-6)
    assert ran == []  # ... and here none: two paths are compared, not one with itself


def test_query_block_is_build_dist_jaccard():
    # their build_dist(q, g, "jaccard") slices the first Q rows' block of the whole matrix (on a GPU only);
    # here the block alone, without the rest
    features = reid_features(seed=3)
    query, gallery = features[:40], features[40:]
    whole = fastreid_jaccard(features, 20, 6)
    block = compat_fastreid.build_dist(query, gallery, "jaccard", k1=20, k2=6)
    assert isinstance(block, np.ndarray) and block.shape == (40, 280)
    np.testing.assert_allclose(block, whole[:40, 40:], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(jaccard_distance(features, 20, 6, num_query=40).numpy(), block)
    # mixed dtypes promote to the wider, as their torch.cat does: a float16 feat_1 leaves feat_2 unrounded
    half = query.half()
    mixed = compat_fastreid.build_dist(half, gallery * 1e5, "jaccard", k1=20, k2=6)
    promoted = torch.cat([half.float(), gallery * 1e5])
    np.testing.assert_array_equal(mixed, jaccard_distance(promoted, 20, 6, num_query=40).numpy())


def test_duplicates_take_their_index_order(monkeypatch):
    # exact duplicates tie (ordered by index; their faiss order is unspecified): the block and the whole
    # matrix agree, the kernels and torch too
    features = reid_features(seed=4)
    features[100:108] = features[100]
    ran = record_kernels(monkeypatch)
    whole = jaccard_distance(features, 10, 3)
    assert {name for name, backend in ran if backend == "cpp"} >= KRECIPROCAL_STAGES
    np.testing.assert_array_equal(jaccard_distance(features, 10, 3, num_query=104).numpy(), whole[:104, 104:].numpy())
    with forced_backend("reference"):
        np.testing.assert_allclose(jaccard_distance(features, 10, 3).numpy(), whole.numpy(), rtol=0, atol=1e-6)
    assert float(whole[100:108, 100:108].max()) < 0.1  # the duplicates are each other's nearest


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_gpu_backends_match_cpu(backend, monkeypatch):
    # "cuda": its neighbour search and sparse-stage kernels (under the CUDA emulator its CUDA code on CPU
    # tensors); "triton": its neighbour search, the sparse stages in torch
    features = reid_features(num_ids=12, seed=5)
    expected = jaccard_distance(features, 10, 4)
    device = device_for(backend)
    ran = record_kernels(monkeypatch)
    with forced_backend(backend):
        result = jaccard_distance(features.to(device), 10, 4)
    assert ("self_knn", backend) in ran  # the backend's own neighbour search ran, not the C++ one
    assert result.device.type == device.type
    np.testing.assert_allclose(result.cpu().numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_fastreid_drop_ins():
    theirs = peers.fastreid_compute_dist()
    features = reid_features(seed=6)
    query, gallery = features[:40], features[40:]
    for metric in ("euclidean", "cosine"):
        result = compat_fastreid.build_dist(query, gallery, metric)
        assert isinstance(result, np.ndarray) and result.dtype == np.float32
        np.testing.assert_allclose(result, theirs.build_dist(query, gallery, metric), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        compat_fastreid.compute_euclidean_distance(query, gallery),
        theirs.compute_euclidean_distance(query, gallery),
        rtol=0,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        compat_fastreid.compute_cosine_distance(query, gallery),
        theirs.compute_cosine_distance(query, gallery),
        rtol=0,
        atol=1e-6,
    )
    half = compat_fastreid.compute_jaccard_distance(features, 20, 6, fp16=True)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, fastreid_jaccard(features, 20, 6), rtol=0, atol=1e-3)


def test_torchreid_compute_distance_matrix():
    theirs = peers.load("torchreid_distance")
    generator = torch.Generator().manual_seed(7)
    input1, input2 = torch.randn(30, 24, generator=generator), torch.randn(50, 24, generator=generator)
    for metric in ("euclidean", "cosine"):
        result = compat_torchreid.compute_distance_matrix(input1, input2, metric)
        assert isinstance(result, torch.Tensor) and result.shape == (30, 50)
        torch.testing.assert_close(result, theirs.compute_distance_matrix(input1, input2, metric), rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match='Unknown distance metric: l1. Please choose either "euclidean" or "cosine"'):
        compat_torchreid.compute_distance_matrix(input1, input2, "l1")


def test_list_in_numpy_out():
    # A list is taken as an array is and answered in numpy (it came back as a torch tensor).
    features = reid_features(num_ids=3).numpy()
    result = jaccard_distance(features.tolist(), 4, 2)
    assert isinstance(result, np.ndarray)
    np.testing.assert_allclose(result, jaccard_distance(features, 4, 2), rtol=0, atol=1e-6)


def test_bad_input():
    features = reid_features(num_ids=3)
    cases = [
        (lambda: jaccard_distance(features, 1, 6), "k1 must be an integer >= 2"),
        (lambda: jaccard_distance(features, 20, 0), "k2 must be an integer >= 1"),
        # Before: past int64 a RuntimeError from the kernels' argument cast
        (
            lambda: jaccard_distance(features, 10**25, 6),
            rf"k1 must be an integer >= 2 and <= {MAX_K}, got 10{'0' * 24}$",
        ),
        (lambda: jaccard_distance(features, 20, 10**25), rf"k2 must be an integer >= 1 and <= {MAX_K}"),
        (lambda: jaccard_distance(features[:1], 20, 6), "features must have at least 2 rows"),
        (lambda: jaccard_distance(features[0], 20, 6), "features must be 2-D"),
        (lambda: jaccard_distance(features, 20, 6, num_query=0), r"num_query must be an integer in \[1, 23\], got 0"),
        (lambda: jaccard_distance(features, 20, 6, num_query=24), r"num_query must be an integer in \[1, 23\]"),
        (
            lambda: jaccard_distance(features.masked_fill(features > 0.3, float("nan")), 20, 6),
            "jaccard_distance: features contains non-finite",
        ),
        (lambda: jaccard_distance(features, 20, 6, strategy="fast"), "^jaccard_distance: strategy must be one of"),
        (lambda: compat_fastreid.build_dist(features, features, "jaccard", k1=3), r"k1 and k2, missing \['k2'\]"),
        (lambda: compat_fastreid.build_dist(features, features[:, :5], "jaccard", k1=3, k2=2), "same width"),
        (lambda: compat_fastreid.build_dist(features[:0], features, "jaccard", k1=3, k2=2), "feat_1 is empty"),
        (lambda: compat_fastreid.build_dist(features, features, "l1"), "Expected metrics are cosine"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
