"""hierarchical_mask_pool: every backend against the reference; opcheck, gradcheck, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params, device_for, op_for, record_kernels
from dpm_ops.ops import hierarchical_mask_pool, hierarchical_mask_pool_reference

KERNEL_BACKENDS = backend_params("cpp", "cuda", "triton")
ALL_BACKENDS = backend_params("reference", "cpp", "cuda", "triton")

# (B, [(C_l, H_l, W_l)], mask (H, W) or None): MaskReID-like levels (small C), odd sizes, one cell,
# upsampled masks, empty batch / channels, one level, the most levels the kernels take (MAX_LEVELS).
CASES = [
    (3, [(5, 9, 7), (4, 4, 3), (6, 2, 1)], (18, 14)),
    (2, [(7, 36, 14), (3, 18, 7), (5, 9, 4)], (144, 56)),
    (1, [(1, 1, 1)], (1, 1)),
    (4, [(3, 5, 6)], (3, 2)),
    (2, [(9, 7, 11), (2, 3, 5)], None),
    (0, [(3, 4, 4), (2, 2, 2)], (8, 8)),
    (3, [(0, 4, 4), (2, 2, 2)], (8, 8)),
    (9, [(70, 5, 2)], None),
    (2, [(2, 3, 2)] * 16, (6, 4)),
]


def make_inputs(B, levels, mask_hw, dtype, device, seed=0, requires_grad=False, binary=True):
    gen = torch.Generator().manual_seed(seed)
    features = [
        torch.randn(B, C, H, W, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
        for C, H, W in levels
    ]
    mask = None
    if mask_hw is not None:
        mask = torch.rand(B, 1, *mask_hw, generator=gen, dtype=dtype)
        mask = (mask > 0.4).to(dtype) if binary else mask
        mask = mask.to(device)
    return features, mask


def tolerances(dtype):
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}


def test_reference_is_plain_global_pooling_without_mask_and_with_a_full_mask():
    features, _ = make_inputs(2, [(3, 5, 4), (2, 3, 3)], None, torch.float64, "cpu")
    ones = torch.ones(2, 1, 10, 8, dtype=torch.float64)
    for mode, pool in (("avg", lambda x: x.mean((2, 3))), ("max", lambda x: x.amax((2, 3)))):
        expected = torch.cat([pool(f) for f in features], 1)
        torch.testing.assert_close(hierarchical_mask_pool_reference(features, None, mode), expected)
        torch.testing.assert_close(hierarchical_mask_pool_reference(features, ones, mode), expected)


def test_reference_resizes_by_area_and_weights_the_average():
    # A 4x4 mask over a 2x2 level: each cell is the foreground fraction of its 2x2 block.
    x = torch.arange(4.0, dtype=torch.float64).view(1, 1, 2, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.25, 0.0, 0.5], dtype=torch.float64)
    out = hierarchical_mask_pool_reference([x], mask.view(1, 1, 4, 4), "avg")
    torch.testing.assert_close(out, (w * x.flatten()).sum().view(1, 1) / w.sum())
    out_max = hierarchical_mask_pool_reference([x], mask.view(1, 1, 4, 4), "max")
    assert out_max.item() == 3.0  # cell 2 (value 2) has no foreground; cell 3 has some


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_backward_match_reference(backend, mode, dtype, case, monkeypatch):
    B, levels, mask_hw = CASES[case]
    device = device_for(backend)
    features, mask = make_inputs(B, levels, mask_hw, dtype, device, seed=case, requires_grad=True, binary=mode == "max")
    expected = hierarchical_mask_pool_reference(features, mask, mode)
    ran = record_kernels(monkeypatch)
    out = hierarchical_mask_pool(features, mask, mode, backend=backend)
    assert ran == [("hierarchical_mask_pool", backend)]  # the kernel ran, not the reference it is checked against
    assert out.dtype == dtype and out.shape == (B, sum(c for c, _, _ in levels))
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, features, grad, allow_unused=True)
    got = torch.autograd.grad(out, features, grad, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, **tolerances(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_all_masked_out_levels_pool_to_zero_with_zero_gradient(backend, mode):
    device = device_for(backend)
    features, mask = make_inputs(3, [(4, 6, 5), (2, 3, 2)], (12, 10), torch.float64, device, requires_grad=True)
    mask[1] = 0
    out = hierarchical_mask_pool(features, mask, mode, backend=backend)
    torch.testing.assert_close(out, hierarchical_mask_pool_reference(features, mask, mode))
    assert torch.all(out[1] == 0)
    grads = torch.autograd.grad(out.sum(), features)
    assert all(torch.all(g[1] == 0) for g in grads)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_max_ties_share_the_gradient_like_amax(backend):
    # Post-ReLU maps are full of zeros: the gradient of a tied max is split evenly (torch.amax's rule).
    device = device_for(backend)
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64, device=device)
    x[0, 0, 1, 1] = x[0, 0, 2, 3] = 1.0
    x.requires_grad_(True)
    out = hierarchical_mask_pool([x], None, "max", backend=backend)
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(x.amax((2, 3)).sum(), x)
    torch.testing.assert_close(got, want)
    # with a mask, only the tied cells it keeps share the gradient: the masked-out zeros (and the 1 at
    # (2, 3)) equal their channel's max but are not pooled
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.float64, device=device)
    mask[:, :, :2] = 1
    out = hierarchical_mask_pool([x], mask, "max", backend=backend)
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(hierarchical_mask_pool_reference([x], mask, "max").sum(), x)
    assert got[:, :, 2:].abs().sum() == 0 and got[0, 0, 1, 1] == 1
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_soft_bool_and_non_contiguous_inputs(backend, mode):
    device = device_for(backend)
    features, mask = make_inputs(4, [(6, 8, 6), (5, 4, 3)], (16, 12), torch.float32, device)
    features = [features[0].to(memory_format=torch.channels_last), features[1].transpose(2, 3)]
    bool_mask = mask > 0
    expected = hierarchical_mask_pool_reference(features, bool_mask.float(), mode)
    torch.testing.assert_close(
        hierarchical_mask_pool(features, bool_mask, mode, backend=backend), expected, **tolerances(torch.float32)
    )
    soft = torch.rand_like(mask)
    torch.testing.assert_close(
        hierarchical_mask_pool(features, soft, mode, backend=backend),
        hierarchical_mask_pool_reference(features, soft, mode),
        **tolerances(torch.float32),
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize(
    "dtype, scale, mask_dtype",
    [
        (torch.float32, 2.0**-170, torch.float64),  # weights below float32's range
        (torch.float32, 2.0**1000, torch.float64),  # above it
        (torch.float64, 2.0**-1030, torch.float64),  # subnormal weights
        (torch.float16, 2.0**-30, torch.float32),  # below float16's range
        (torch.float16, 2.0**17, torch.float32),  # above it
        (torch.float16, 2.0**40, torch.int64),
    ],
)
def test_pooled_values_do_not_depend_on_the_mask_scale(backend, mode, dtype, scale, mask_dtype):
    """The weights are relative: a mask scaled by a power of two (exact), its values outside the maps'
    dtype's range included, pools as the mask itself, bit for bit, never to 0 or to a false error."""
    if dtype == torch.float16 and backend in ("cuda", "triton") and not torch.cuda.is_available():
        pytest.skip("fp16 GPU kernels run on GPU")
    device = device_for(backend)
    features, mask = make_inputs(3, [(4, 6, 5), (3, 3, 2)], (12, 10), dtype, device, binary=False)
    mask = (mask * 8).round() / 8  # multiples of 1/8: exact after any of the scalings below
    expected = hierarchical_mask_pool(features, mask, mode, backend=backend)
    scaled = (mask.double() * scale).to(mask_dtype)
    torch.testing.assert_close(
        hierarchical_mask_pool(features, scaled, mode, backend=backend), expected, rtol=0, atol=0
    )
    assert bool((expected != 0).any())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype, small", [(torch.float16, 1e-9), (torch.float32, 1e-60), (torch.float64, 1e-300)])
def test_max_pools_over_every_cell_of_a_positive_weight(backend, dtype, small):
    """Max mode takes the cells of weight w > 0: float16 maps had their weights in float16, where one below 6e-8
    of the sample's largest was 0 (and float32 ones below 1e-45): its cell was left out."""
    if dtype == torch.float16 and backend in ("cuda", "triton") and not torch.cuda.is_available():
        pytest.skip("fp16 GPU kernels run on GPU")
    device = device_for(backend)
    features = [torch.tensor([[[[0.0, 5.0]]]], dtype=dtype, device=device)]
    mask = torch.tensor([[[[1.0, small]]]], dtype=torch.float64, device=device)
    assert hierarchical_mask_pool(features, mask, "max", backend=backend).tolist() == [[5.0]]
    (average,) = hierarchical_mask_pool(features, mask, "avg", backend=backend).flatten().tolist()
    assert 0 <= average < 1e-37  # 5 x the small weight; for float32 at most 5 x its smallest normal


def test_reference_resizes_a_half_precision_mask_in_float32():
    """A float16 mask's area averages underflowed to 0 in float16 (the kernels resize in float32)."""
    mask = torch.zeros(1, 1, 1, 8192, dtype=torch.float16)
    mask[..., 0], mask[..., 4096] = 1.0, 1e-4
    x = torch.tensor([[[[0.0, 5.0]]]], dtype=torch.float16)
    assert hierarchical_mask_pool_reference([x], mask, "max").tolist() == [[5.0]]


def test_reference_computes_half_precision_in_float32():
    """fp16 maps whose weighted sums exceed float16's range pool as in float32 (the kernels' rule)."""
    x = torch.full((1, 2, 4, 4), 60000.0, dtype=torch.float16)
    out = hierarchical_mask_pool_reference([x], torch.ones(1, 1, 4, 4, dtype=torch.float16), "avg")
    assert out.dtype == torch.float16 and out.tolist() == [[60000.0, 60000.0]]


def test_mask_gets_no_gradient():
    features, mask = make_inputs(2, [(3, 4, 4)], (8, 8), torch.float64, "cpu", requires_grad=True)
    mask.requires_grad_(True)
    hierarchical_mask_pool(features, mask).sum().backward()
    assert mask.grad is None and features[0].grad is not None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck_float64(backend, mode, with_mask, monkeypatch):
    ran = record_kernels(monkeypatch)
    device = device_for(backend)
    features, mask = make_inputs(
        2,
        [(3, 4, 3), (2, 2, 5)],
        (8, 10) if with_mask else None,
        torch.float64,
        device,
        requires_grad=True,
        binary=False,
    )
    assert torch.autograd.gradcheck(
        lambda a, b: hierarchical_mask_pool([a, b], mask, mode, backend=backend),
        features,
        fast_mode=backend == "triton",
    )  # the Triton interpreter is slow
    assert ran and {b for _, b in ran} == {backend}  # the kernel, not the reference, was checked


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_opcheck(backend, mode):
    features, mask = make_inputs(
        2, [(3, 4, 3), (2, 2, 5)], (8, 10), torch.float64, device_for(backend), requires_grad=True, binary=False
    )
    torch.library.opcheck(op_for("hierarchical_mask_pool", backend), (features, mask, mode))
    torch.library.opcheck(op_for("hierarchical_mask_pool", backend), (features, None, mode))


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_opcheck_backward_op(backend):
    features, mask = make_inputs(2, [(3, 4, 3), (2, 2, 5)], (8, 10), torch.float64, device_for(backend))
    out = op_for("hierarchical_mask_pool", backend)(features, mask, "max")
    torch.library.opcheck(
        op_for("hierarchical_mask_pool_backward", backend), (torch.randn_like(out), features, mask, out, "max")
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    features, mask = make_inputs(
        2, [(3, 4, 3), (2, 2, 5)], (8, 10), torch.float64, device_for(backend), requires_grad=True
    )

    def loss(a, b, mask):
        return (hierarchical_mask_pool([F.relu(a), b * 2], mask, "avg", backend=backend) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(*features, mask)
    expected = (hierarchical_mask_pool_reference([F.relu(features[0]), features[1] * 2], mask, "avg") ** 2).sum()
    torch.testing.assert_close(value, expected)
    for got, want in zip(torch.autograd.grad(value, features), torch.autograd.grad(expected, features)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_shape(backend):
    if backend == "triton" and device_for(backend).type == "cpu":
        pytest.skip("the Triton interpreter is slow; large shapes run on GPU only")
    device = device_for(backend)
    features, mask = make_inputs(64, [(384, 36, 14), (768, 18, 7), (1536, 9, 4)], (144, 56), torch.float32, device)
    for mode in ("avg", "max"):
        torch.testing.assert_close(
            hierarchical_mask_pool(features, mask, mode, backend=backend),
            hierarchical_mask_pool_reference(features, mask, mode),
            **tolerances(torch.float32),
        )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_large_map_average_is_within_two_ulp_of_float64_truth(backend, masked):
    # A 512 x 512 map: summed in fp32 in order (a SIMD or warp lane's share of the cells, the Triton
    # kernel's tiles), the average was up to 23 ulp off float64 truth (2e-5 at 2048 x 2048); the rows'
    # fp64 sums leave the roundings of the weights, their sum and the result.
    device = device_for(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 512, 512, generator=gen) + 1.0
    mask = torch.rand(1, 1, 512, 512, generator=gen) if masked else None
    got = hierarchical_mask_pool([x.to(device)], None if mask is None else mask.to(device), "avg", backend=backend)
    truth = hierarchical_mask_pool_reference([x.double()], None if mask is None else mask.double(), "avg")
    assert ((got.cpu().double() - truth).abs() / truth).max() <= 2 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(backend, dtype):
    features, mask = make_inputs(5, [(7, 6, 5), (3, 3, 3)], (12, 10), dtype, device_for(backend), requires_grad=True)
    for mode in ("avg", "max"):
        out = hierarchical_mask_pool(features, mask, mode, backend=backend)
        assert out.dtype == dtype
        full = [f.detach().float().requires_grad_() for f in features]
        expected = hierarchical_mask_pool_reference(full, mask.float(), mode)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        grads = torch.autograd.grad(out.float().sum(), features)
        assert all(g.dtype == dtype for g in grads)
        # the gradients' values too (finite ones of any size passed): the fp32 reference's, in the dtype
        for got, want in zip(grads, torch.autograd.grad(expected.sum(), full)):
            torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda f, m: ([], m, "avg"), "features must be a non-empty list"),
        (lambda f, m: (f[0], m, "avg"), "features must be a non-empty list"),
        (lambda f, m: ([f[0][0]], m, "avg"), r"features\[0\] must be 4-D"),
        (lambda f, m: ([f[0], f[1][:1]], m, "avg"), r"features\[1\] has batch 1"),
        (lambda f, m: ([f[0], f[1].double()], m, "avg"), r"features\[1\] must share dtype"),
        (lambda f, m: ([f[0].long()], m, "avg"), r"features\[0\] must be floating point"),
        (lambda f, m: ([f[0][:, :, :0]], m, "avg"), r"features\[0\] has an empty spatial size"),
        (lambda f, m: (f, m[:, 0], "avg"), "mask must be"),
        (lambda f, m: (f, m[:1], "avg"), "mask must be"),
        (lambda f, m: (f, m.repeat(1, 2, 1, 1), "avg"), "mask must be"),  # one channel only
        (lambda f, m: (f, m[:, :, :0], "avg"), r"mask must be \(B, 1, H, W\) with B = 2, got \(2, 1, 0, 10\)"),
        (lambda f, m: (f, m[:, :, :, :0], "avg"), r"mask must be \(B, 1, H, W\) with B = 2, got \(2, 1, 8, 0\)"),
        (lambda f, m: (f, m, "sum"), "mode must be one of"),
        (lambda f, m: ([f[0]] * 17, m, "avg"), "at most 16"),
    ],
)
def test_bad_input_names_the_argument(backend, bad, message):
    features, mask = make_inputs(2, [(3, 4, 3), (2, 2, 5)], (8, 10), torch.float32, device_for(backend))
    with pytest.raises(ValueError, match=message):
        hierarchical_mask_pool(*bad(features, mask), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_non_finite_maps_of_a_sample_with_an_all_zero_mask_are_refused(backend, mode):
    # avg mode finds NaN / inf in its output, but an all-zero mask pools to 0 without a sum: taken as 0
    features, mask = make_inputs(2, [(3, 4, 3), (2, 2, 5)], (8, 10), torch.float32, device_for(backend))
    mask[1] = 0.0
    features[1][1, 0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^hierarchical_mask_pool: features\[1\] contains non-finite values"):
        hierarchical_mask_pool(features, mask, mode, backend=backend)
    features[1][1, 0, 1, 3] = 0.0
    assert hierarchical_mask_pool(features, mask, mode, backend=backend)[1].eq(0).all()  # pooled to 0


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_direct_op_call_checks_too(backend):
    features, mask = make_inputs(2, [(3, 4, 3)], (8, 10), torch.float32, "cpu")
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.dpm_ops.hierarchical_mask_pool(features, mask, "sum")
    with pytest.raises(ValueError, match="mask must be"):
        torch.ops.dpm_ops.hierarchical_mask_pool(features, mask[:, 0:1, :, :].expand(2, 2, 8, 10), "avg")


@pytest.mark.parametrize("skip", ["avg", "max", "conv_avg"])
@pytest.mark.parametrize("level_norm", [None, "bn", "l2"])
@pytest.mark.parametrize("fuse_levels", [True, False])
def test_skipped_fusion_head_pools_as_the_per_level_loop(skip, level_norm, fuse_levels):
    # MaskReID's skipped fusing layer now pools every level in one fused call; it must equal the
    # per-level global pool + per-level norm + concat it replaced (value and gradients).
    from dpm_ops.models import SkippedFusionHead

    torch.manual_seed(0)
    head = SkippedFusionHead([6, 8, 10], embed_dim=4, skip=skip, fuse_levels=fuse_levels, level_norm=level_norm)
    levels = [torch.randn(3, c, h, w, requires_grad=True) for c, h, w in ((6, 9, 4), (8, 5, 2), (10, 3, 2))]

    def per_level_loop(levels):
        levels = levels if fuse_levels else levels[-1:]
        vectors = []
        for index, level in enumerate(levels):
            if head.skip_convs is not None and index < len(head.skip_convs):
                level = head.skip_convs[index](level)
            vector = level.amax((2, 3)) if skip == "max" else level.mean((2, 3))
            if head.level_bns is not None:
                vector = head.level_bns[index](vector)
            elif level_norm == "l2":
                vector = F.normalize(vector, dim=1)
            vectors.append(vector)
        return torch.cat(vectors, 1)

    got = head.pool_levels(levels)
    want = per_level_loop(levels)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(want)
    for g, w in zip(
        torch.autograd.grad((got * weights).sum(), levels, allow_unused=True),
        torch.autograd.grad((want * weights).sum(), levels, allow_unused=True),
    ):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w)
