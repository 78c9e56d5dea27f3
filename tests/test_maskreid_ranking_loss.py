"""maskreid_ranking_loss: every backend against the reference (maskreid.md §4.1–4.2, Eqs. 5 and 4), in value and
gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

import dpm_ops
from conftest import backend_params, device_for, op_for, record_kernels
from dpm_ops.losses import MaskReIDRankingLoss
from dpm_ops.losses import maskreid_ranking_loss as loss_module_function
from dpm_ops.ops import maskreid_ranking_loss, maskreid_ranking_loss_reference

KERNEL_BACKENDS = backend_params("cpp", "cuda", "triton")
# neg_mode is Eq. 5's hinge: Eq. 4 ("eq4") takes only the default
MODES = [(n, p) for n in ("literal", "violating_only") for p in ("hardest", "all_eq5")] + [("literal", "eq4")]


def tolerances(dtype):
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-6, "rtol": 2e-5}


def batch(labels, dim, dtype=torch.float64, seed=0, device="cpu", spread=0.7):
    """L2-normalised embeddings, same-identity samples clustered so that some negatives satisfy the
    margin and some do not."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    centres = torch.randn(int(labels.max()) + 1 if len(labels) else 1, dim, generator=gen, dtype=torch.float64)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)
    return F.normalize(x, dim=1).to(device, dtype), labels.to(device)


def paper_labels(identity_images=10, singletons=54):
    return [0] * identity_images + list(range(1, singletons + 1))


# (labels, D): batch of one, a lone pair (anchors without negatives) and n = 2 apart (no anchor), no
# positive at all, no negative at all, the paper's 10 + 54 batch at MaskReID's 256-d, P×K batches,
# random labels with singletons.
CASES = {
    "one": ([5], 8),
    "pair": ([3, 3], 5),
    "pair-apart": ([3, 4], 5),
    "no-positive": (list(range(7)), 6),
    "no-negative": ([2] * 6, 9),
    "paper": (paper_labels(), 256),
    "pk": ([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], 33),
    "random": (torch.randint(0, 9, (37,), generator=torch.Generator().manual_seed(1)).tolist(), 17),
}


def value_and_grad(fn, x, labels, **kw):
    leaf = x.detach().clone().requires_grad_(True)
    value = fn(leaf, labels, **kw)
    (grad,) = torch.autograd.grad(value * 1.3, leaf)  # an upstream gradient other than 1
    return value.detach(), grad


def assert_matches_reference(x, labels, backend, **kw):
    with pytest.MonkeyPatch.context() as monkeypatch:
        ran = record_kernels(monkeypatch)
        value, grad = value_and_grad(
            lambda e, l, **k: maskreid_ranking_loss(e, l, backend=backend, **k), x, labels, **kw
        )
    assert ran == [("maskreid_ranking_loss", backend)]  # the kernel ran, not the reference it is checked against
    expected, expected_grad = value_and_grad(maskreid_ranking_loss_reference, x, labels, **kw)
    assert value.dtype == expected.dtype and value.shape == ()
    assert grad.dtype == x.dtype
    torch.testing.assert_close(value, expected, **tolerances(x.dtype))
    torch.testing.assert_close(grad, expected_grad, **tolerances(x.dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("neg_mode, pos_mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, neg_mode, pos_mode, case, dtype):
    if backend == "triton" and case == "paper" and dtype == torch.float64 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter runs the 64 rows in ~1.5 s; the fp32 case covers it")
    labels, dim = CASES[case]
    x, labels = batch(labels, dim, dtype, seed=len(labels), device=device_for(backend))
    assert_matches_reference(x, labels, backend, neg_mode=neg_mode, pos_mode=pos_mode)


def test_edge_case_values():
    x, labels = batch(list(range(7)), 6)
    assert maskreid_ranking_loss(x, labels).item() == 0.0  # no anchor: 0, not NaN
    x, labels = batch([2] * 6, 9)
    x.requires_grad_(True)
    only_pull = maskreid_ranking_loss(x, labels)  # no negative: log(1 + 0) + the pull term
    sim = x @ x.t()
    pull = ((sim - 1) ** 2).sum() / 5 * 2.0 / 2 / 6  # λ/(2|P|) Σ over the 6 anchors' 5 positives, mean over 6
    torch.testing.assert_close(only_pull, pull)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("neg_mode, pos_mode", MODES)
def test_ties_in_the_hardest_mining_and_at_the_hinge(backend, neg_mode, pos_mode):
    """Exact ties: two identical hardest positives (torch.min's first index takes the gradient) and,
    with α = 0, a negative exactly as similar as the hardest positive (z = 0: term exp(0) = 1 in the
    literal reading, 0 in violating_only, zero weight in both)."""
    device = device_for(backend)
    e = torch.eye(4, dtype=torch.float64)
    x = torch.stack([e[0], (e[0] + e[1]) / 2, e[1], e[1], e[0] * 0.5 + e[2] * 0.5, e[3], e[2]]).to(device)
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 1], device=device)
    for alpha in (0.0, 0.15):
        assert_matches_reference(x, labels, backend, alpha=alpha, neg_mode=neg_mode, pos_mode=pos_mode)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_options_and_label_dtypes(backend):
    device = device_for(backend)
    x, labels = batch(CASES["pk"][0], 20, device=device)
    assert_matches_reference(x, labels.int(), backend, alpha=0.3, lam=0.5)
    assert_matches_reference(x, labels.to(torch.uint8), backend, alpha=-0.1, lam=0.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("pos_mode", ["all_eq5", "eq4"])
def test_non_contiguous_embeddings(backend, pos_mode):
    device = device_for(backend)
    x, labels = batch(CASES["random"][0], 17, torch.float32, device=device)
    strided = torch.cat([x, x], dim=1)[:, ::2]
    transposed = x.t().contiguous().t()
    for y in (strided, transposed):
        assert not y.is_contiguous()
        assert_matches_reference(y, labels, backend, pos_mode=pos_mode)


def literal_eq4(x, labels):
    """Eq. 4 as printed: the double sum over (positive, negative) pairs, mean over anchors."""
    sim = x @ x.t()
    losses = []
    for k in range(len(labels)):
        positives = [i for i in range(len(labels)) if i != k and labels[i] == labels[k]]
        negatives = [j for j in range(len(labels)) if labels[j] != labels[k]]
        if positives:
            pairs = [torch.exp(sim[k, j] - sim[k, i]) for i in positives for j in negatives]
            losses.append(torch.log(1 + sum(pairs, sim.new_zeros(()))))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
def test_eq4_by_hand(backend):
    """e1, e2, (e1 + e2)/√2 of one identity, −e1 and e3 singletons: anchors 0, 1, 2 with
    s = 0, 1/√2 | −1, 0;  0, 1/√2 | 0, 0;  1/√2, 1/√2 | −1/√2, 0  (positives | negatives), and
    L_k = log(1 + Σ_i Σ_j exp(s_kj − s_ki)) = log(1 + Σ_j exp(s_kj) · Σ_i exp(−s_ki))."""
    device = device_for(backend)
    r = 1 / math.sqrt(2)
    x = torch.tensor([[1, 0, 0], [0, 1, 0], [r, r, 0], [-1, 0, 0], [0, 0, 1]], dtype=torch.float64, device=device)
    labels = torch.tensor([0, 0, 0, 1, 2], device=device)
    by_hand = (
        math.log(1 + (math.exp(-1) + 1) * (1 + math.exp(-r)))
        + math.log(1 + 2 * (1 + math.exp(-r)))
        + math.log(1 + (math.exp(-r) + 1) * 2 * math.exp(-r))
    ) / 3
    value, grad = value_and_grad(lambda e, l: maskreid_ranking_loss(e, l, pos_mode="eq4", backend=backend), x, labels)
    assert value.item() == pytest.approx(by_hand, rel=1e-14)
    _, literal_grad = value_and_grad(lambda e, l: literal_eq4(e, l), x, labels)
    torch.testing.assert_close(grad, literal_grad, **tolerances(torch.float64))


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
def test_eq4_is_stable_where_the_double_sum_overflows(backend):
    """Unnormalised fp32 embeddings with |s| up to ~150: exp(s_kj − s_ki) overflows fp32, the
    log-sum-exp form does not; the fp64 double sum is the truth."""
    x, labels = batch(CASES["pk"][0], 8, torch.float64, device=device_for(backend), spread=3.0)
    x = x * 12
    assert not literal_eq4(x.float(), labels).isfinite()  # some exp(s_kj − s_ki) is past fp32's range
    value, grad = value_and_grad(
        lambda e, l: maskreid_ranking_loss(e, l, pos_mode="eq4", backend=backend), x.float(), labels
    )
    expected, expected_grad = value_and_grad(literal_eq4, x, labels)
    torch.testing.assert_close(value, expected.float())
    torch.testing.assert_close(grad, expected_grad.float())


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
def test_eq4_at_large_equal_similarities(backend):
    """Identical embeddings of norm 1e10: every s = 1e20, so every exp(s_kj − s_ki) = 1 and the literal
    double sum is exact; added to 1e20 before the shifts cancel, log |N| and log |P| rounded away (the
    loss was log 2) and the reference's softmax gradients summed to |N|, not 1."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2], device=device_for(backend))
    x = torch.full((len(labels), 4), 0.5e10, dtype=torch.float64, device=labels.device)
    value, grad = value_and_grad(lambda e, l: maskreid_ranking_loss(e, l, pos_mode="eq4", backend=backend), x, labels)
    expected, expected_grad = value_and_grad(literal_eq4, x, labels)
    assert expected.item() == pytest.approx((3 * math.log(1 + 2 * 3) + 2 * math.log(1 + 1 * 4)) / 5, rel=1e-14)
    torch.testing.assert_close(value, expected, **tolerances(torch.float64))
    torch.testing.assert_close(grad, expected_grad, **tolerances(torch.float64))


def test_cpp_takes_bfloat16_in_fp32():
    x, labels = batch(CASES["pk"][0], 16, torch.bfloat16)
    value, grad = value_and_grad(lambda e, l: maskreid_ranking_loss(e, l, backend="cpp"), x, labels)
    expected, expected_grad = value_and_grad(maskreid_ranking_loss_reference, x, labels)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("neg_mode, pos_mode", MODES)
def test_gradcheck_float64(backend, neg_mode, pos_mode, monkeypatch):
    x, labels = batch([0, 0, 0, 1, 1, 2, 3], 5, device=device_for(backend), spread=1.0)
    x.requires_grad_(True)
    ran = record_kernels(monkeypatch)
    assert torch.autograd.gradcheck(
        lambda e: maskreid_ranking_loss(e, labels, neg_mode=neg_mode, pos_mode=pos_mode, backend=backend),
        (x,),
        fast_mode=True,
    )
    assert ran and {b for _, b in ran} == {backend}  # the kernel, not the reference, was checked


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "neg_mode, pos_mode", [("literal", "hardest"), ("violating_only", "all_eq5"), ("literal", "eq4")]
)
def test_opcheck(backend, neg_mode, pos_mode):
    x, labels = batch([0, 0, 1, 1, 1, 2], 7, device=device_for(backend))
    x.requires_grad_(True)
    torch.library.opcheck(op_for("maskreid_ranking_loss", backend), (x, labels, 0.15, 2.0, neg_mode, pos_mode))
    _, coef = op_for("maskreid_ranking_loss", backend)(x.detach(), labels, 0.15, 2.0, neg_mode, pos_mode)
    torch.library.opcheck(
        op_for("maskreid_ranking_loss_backward", backend),
        (torch.tensor(0.5, dtype=x.dtype, device=x.device), x.detach().float(), coef),
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, labels = batch([0, 0, 1, 1, 1, 2, 2], 6, device=device_for(backend))
    x.requires_grad_(True)

    def loss(x, labels):
        return maskreid_ranking_loss(F.normalize(x * 2, dim=1), labels, pos_mode="all_eq5", backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x, labels)
    (grad,) = torch.autograd.grad(value, x)
    expected = maskreid_ranking_loss_reference(F.normalize(x * 2, dim=1), labels, pos_mode="all_eq5")
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, x)[0])


@pytest.mark.parametrize("neg_mode, pos_mode", MODES)
def test_loss_module_runs_the_fused_op_by_default(neg_mode, pos_mode):
    x, labels = batch(paper_labels(4, 12), 32)
    fused = value_and_grad(lambda e, l: MaskReIDRankingLoss(neg_mode=neg_mode, pos_mode=pos_mode)(e, l), x, labels)
    plain = value_and_grad(
        lambda e, l: loss_module_function(e, l, neg_mode=neg_mode, pos_mode=pos_mode, backend="reference"), x, labels
    )
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))
    if dpm_ops.backends()["cpp"][0]:  # the fused op is what autograd recorded
        assert "dpm_ops_maskreid_ranking_loss" in loss_module_function(x.requires_grad_(True), labels).grad_fn.name()
    assert MaskReIDRankingLoss().backend is None and MaskReIDRankingLoss(backend="reference").backend == "reference"


def test_literal_floor_with_the_papers_batch():
    """Every constraint satisfied: the literal Eq. 5 stays at log(1 + 54), the violating-only reading at 0,
    Eq. 4 (no hinge) at log(1 + 9·54·e⁻²): each pair still adds exp(s_kj − s_ki) = exp(−1 − 1)."""
    x = torch.zeros(64, 4, dtype=torch.float64)
    x[:10, 0] = 1.0
    x[10:, 0] = -1.0
    labels = torch.tensor(paper_labels())
    assert maskreid_ranking_loss(x, labels).item() == pytest.approx(math.log(55))
    assert maskreid_ranking_loss(x, labels, neg_mode="violating_only").item() == 0.0
    assert maskreid_ranking_loss(x, labels, pos_mode="all_eq5").item() == pytest.approx(math.log(1 + 9 * 54))
    assert maskreid_ranking_loss(x, labels, pos_mode="eq4").item() == pytest.approx(math.log(1 + 9 * 54 * math.exp(-2)))


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x, l: (x[0], l, {}), "embeddings must be 2-D"),
        (lambda x, l: (x.long(), l, {}), "embeddings must be floating point"),
        (lambda x, l: (x, l[:-1], {}), "labels must be 1-D with B = 6"),
        (lambda x, l: (x, l[None], {}), "labels must be 1-D"),
        (lambda x, l: (x, l.float(), {}), "labels must be integer"),
        (lambda x, l: (x, l, {"alpha": float("nan")}), "alpha must be a finite number"),
        (lambda x, l: (x, l, {"lam": "2"}), "lam must be a finite number"),
        # lam weighs the positive pull: -2 was accepted and pushed positives apart
        (lambda x, l: (x, l, {"lam": -2.0}), r"lam must be a finite number in \[0, 1e\+06\], got -2\.0$"),
        (lambda x, l: (x, l, {"neg_mode": "soft"}), "neg_mode must be one of"),
        (lambda x, l: (x, l, {"pos_mode": "easiest"}), "pos_mode must be one of"),
        (lambda x, l: (x, l, {"pos_mode": "all"}), "pos_mode 'all' was renamed 'all_eq5' .*Eq. 4 is 'eq4'"),
        (
            lambda x, l: (x, l, {"pos_mode": "eq4", "neg_mode": "violating_only"}),
            "neg_mode does not apply to pos_mode 'eq4'",
        ),
        (lambda x, l: (x, [0, 0, 1, 1, 2, 2], {}), "labels must be a torch.Tensor"),
        # Eq. 5's sum of B^2 terms exp(... + alpha) overflows float32 for any norm: log(max) - 2 log(6) = 85.1
        (
            lambda x, l: (x, l, {"alpha": 85.2}),
            r"alpha must stay below 85\.1 at B = 6 \(.* overflows float32\), got 85\.2$",
        ),
        (  # before, 85.1 - 1e39 + 1e39: "alpha must stay below 0"
            lambda x, l: (x, l, {"alpha": 1e39}),
            r"alpha must stay below 85\.1 at B = 6 \(.* overflows float32\), got 1e\+39$",
        ),
        (
            lambda x, l: (x, l, {"alpha": 85.0}),
            r"embeddings is too large in magnitude: row norms must stay below 0\.264 in float32",
        ),
    ],
)
def test_bad_input_names_the_argument(backend, bad, message):
    x, labels = batch([0, 0, 1, 1, 2, 2], 4, torch.float32, device=device_for(backend))
    x, labels, kw = bad(x, labels)
    with pytest.raises(ValueError, match=message):
        maskreid_ranking_loss(x, labels, backend=backend, **kw)


def test_direct_op_calls_check_too():
    x, labels = batch([0, 0, 1], 4)
    with pytest.raises(ValueError, match="neg_mode must be 'literal' or 'violating_only'"):
        torch.ops.dpm_ops.maskreid_ranking_loss(x, labels, 0.15, 2.0, "soft", "hardest")
    with pytest.raises(ValueError, match="pos_mode 'all' was renamed 'all_eq5'"):
        torch.ops.dpm_ops.maskreid_ranking_loss(x, labels, 0.15, 2.0, "literal", "all")
    with pytest.raises(ValueError, match="pos_mode must be 'hardest', 'all_eq5' or 'eq4'"):
        torch.ops.dpm_ops.maskreid_ranking_loss(x, labels, 0.15, 2.0, "literal", "easiest")
    with pytest.raises(ValueError, match="neg_mode does not apply to pos_mode 'eq4'"):
        torch.ops.dpm_ops.maskreid_ranking_loss(x, labels, 0.15, 2.0, "violating_only", "eq4")
    with pytest.raises(ValueError, match="labels must be 1-D"):
        torch.ops.dpm_ops.maskreid_ranking_loss(x, labels[:2], 0.15, 2.0, "literal", "hardest")
    with pytest.raises(ValueError, match="pos_mode 'all' was renamed 'all_eq5'"):
        torch.ops.dpm_ops.maskreid_ranking_loss_triton(x, labels, 0.15, 2.0, "literal", "all")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            maskreid_ranking_loss(x.cuda(), labels)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
@pytest.mark.parametrize("pos_mode, n", [("hardest", 400), ("all_eq5", 120), ("eq4", 400)])
def test_large_batch_runs_the_parallel_row_pass(backend, pos_mode, n):
    """Batches big enough for several OpenMP tasks per pass (the paper's batch runs on one thread)."""
    labels = torch.randint(0, n // 4, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    x, labels = batch(labels, 24, torch.float32, device=device_for(backend))
    assert_matches_reference(
        x, labels, backend, pos_mode=pos_mode, neg_mode="literal" if pos_mode == "eq4" else "violating_only"
    )


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_the_math_in_fp32(backend, dtype):
    """Under bf16 autocast the fused op's similarity GEMM stays fp32, as the embeddings given."""
    x, labels = batch(CASES["pk"][0], 16, dtype, device=device_for(backend))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        value, grad = value_and_grad(lambda e, l: maskreid_ranking_loss(e, l, backend=backend), x, labels)
    expected, expected_grad = value_and_grad(lambda e, l: maskreid_ranking_loss_reference(e.float(), l), x, labels)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", backend_params("reference", "cpp"))
def test_eq5_norm_bound_is_where_the_pair_sum_overflows(backend):
    # Eq. 5 sums B^2 terms exp(s_kj - s_ki + alpha), |s| <= |x|^2: rows are accepted up to the norm M with
    # B^2 exp(2 M^2 + alpha) = float32's max (6.3 at B = 64, alpha = 0.15), and rejected past it.
    batch, alpha = 64, 0.15
    bound = math.sqrt((math.log(torch.finfo(torch.float32).max) - 2 * math.log(batch) - alpha) / 2)
    assert bound == pytest.approx(6.33, abs=0.01)
    labels = torch.arange(batch) // 4
    rows = F.normalize(torch.randn(batch, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert torch.isfinite(maskreid_ranking_loss(rows * 0.99 * bound, labels, alpha=alpha, backend=backend))
    with pytest.raises(ValueError, match="embeddings is too large in magnitude: row norms must stay below 6.33"):
        maskreid_ranking_loss(rows * 1.01 * bound, labels, alpha=alpha, backend=backend)
