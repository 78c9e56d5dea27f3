"""Each loss against a brute-force, per-element transcription of its spec equation (float64), in
value and gradient. The brute forces loop the way the official code or the paper's formula reads;
they share no code with dpm_ops.losses."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from conftest import record_kernels

from dpm_ops.losses import (
    BaselineReIDLoss,
    DPMLoss,
    HEMLoss,
    MaskReIDRankingLoss,
    MaskedArcFaceLoss,
    SoftMarginTripletLoss,
    arcface_logits,
    batch_hard_soft_margin_triplet,
    hem_loss,
    masked_arcface_cross_entropy,
    masked_arcface_logits,
    maskreid_ranking_loss,
    pairwise_euclidean,
)
from dpm_ops.models import DPMLossInputs, DPMTrainOutput, ViTBaselineTrainOutput
from dpm_ops.models.param_groups import sgd_param_groups

DOUBLE = dict(dtype=torch.float64)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def assert_same_value_and_grad(loss_fn, reference_fn, inputs, atol=1e-9, rtol=1e-7):
    ours, theirs = leaves(*inputs), leaves(*inputs)
    value, expected = loss_fn(*ours), reference_fn(*theirs)
    torch.testing.assert_close(value, expected, atol=atol, rtol=rtol)
    grads = torch.autograd.grad(value, ours)
    expected_grads = torch.autograd.grad(expected, theirs)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def brute_cross_entropy(logits, labels):
    rows = [-(logits[b, labels[b]] - torch.log(torch.exp(logits[b]).sum())) for b in range(len(labels))]
    return torch.stack(rows).mean()


# ---------------------------------------------------------------- masked ArcFace (dpm.md §3)


def official_masked_arcface_logits(x, mask, weight, labels, s, m, easy_margin):
    """MArcface's per-sample loop, margin branch by branch."""
    w_hat = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = []
    for b in range(x.shape[0]):
        f_hat = x[b] / x[b].norm().clamp_min(1e-12)
        masked_protos = mask[b] * w_hat
        masked_protos = masked_protos / masked_protos.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = masked_protos @ f_hat
        row = []
        for k in range(weight.shape[0]):
            c = cos[k]
            if k == labels[b]:
                phi = c * math.cos(m) - torch.sqrt(1 - c * c) * math.sin(m)
                if easy_margin:
                    phi = phi if c > 0 else c
                else:
                    phi = phi if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
                c = phi
            row.append(s * c)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def arcface_inputs(batch=5, classes=7, dim=16, seed=0, anti_aligned=()):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=generator, **DOUBLE)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    x = torch.randn(batch, dim, generator=generator, **DOUBLE) * 3
    for b in anti_aligned:  # far past θ = π − m: the linear fallback branch
        x[b] = -weight[labels[b]] * 5 + 0.1 * torch.randn(dim, generator=generator, **DOUBLE)
    mask = torch.rand(batch, dim, generator=generator, **DOUBLE)
    for b in anti_aligned:  # a near-uniform mask barely rotates the prototype
        mask[b] = 0.5 + 0.01 * mask[b]
    return x, mask, weight, labels


@pytest.mark.parametrize("margin,easy_margin", [(0.5, False), (0.3, False), (0.5, True)])
def test_masked_arcface_cross_entropy_matches_official_loop(margin, easy_margin):
    x, mask, weight, labels = arcface_inputs(anti_aligned=(1, 3))
    cos_target = masked_arcface_logits(x, mask, weight, None, scale=1.0).gather(1, labels[:, None])
    assert (cos_target < math.cos(math.pi - margin)).sum() == 2  # both branches are exercised

    def ours(x, mask, weight):
        return masked_arcface_cross_entropy(x, mask, weight, labels, 30.0, margin, easy_margin)

    def reference(x, mask, weight):
        plain = brute_cross_entropy(x @ weight.t(), labels)
        masked = brute_cross_entropy(
            official_masked_arcface_logits(x, mask, weight, labels, 30.0, margin, easy_margin), labels
        )
        return 0.5 * plain + 0.5 * masked

    assert_same_value_and_grad(ours, reference, (x, mask, weight))


def test_masked_arcface_loss_module_defaults_and_weights():
    loss = MaskedArcFaceLoss()
    assert (loss.scale, loss.margin, loss.easy_margin, loss.plain_weight, loss.masked_weight) == (
        30.0,
        0.5,
        False,
        0.5,
        0.5,
    )
    x, mask, weight, labels = arcface_inputs()
    masked_only = MaskedArcFaceLoss(plain_weight=0.0, masked_weight=1.0)(x, mask, weight, labels)
    expected = brute_cross_entropy(official_masked_arcface_logits(x, mask, weight, labels, 30.0, 0.5, False), labels)
    torch.testing.assert_close(masked_only, expected)
    torch.testing.assert_close(loss(x, mask, weight, labels), masked_arcface_cross_entropy(x, mask, weight, labels))


def test_arcface_clamp_keeps_gradients_finite_at_cos_one():
    cosine = torch.tensor([[1.0, 0.2, -1.0], [-1.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])  # target cos = 1 and = -1: sqrt(1 - cos²) = 0 without the clamp
    logits = arcface_logits(cosine, labels)
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(logits).all() and torch.isfinite(cosine.grad).all()
    # non-target entries keep the raw cosine
    torch.testing.assert_close(logits[0, 1:], 30.0 * cosine[0, 1:].detach())
    # the target at cos = 1 gets cos(0 + m) up to the clamp
    assert logits[0, 0].item() == pytest.approx(30 * math.cos(0.5), abs=1e-2)
    # a feature lying on its prototype: the masked cosine is 1 in fp32
    weight = torch.randn(4, 8)
    x = weight[[2]].clone().requires_grad_(True)
    loss = masked_arcface_cross_entropy(x, torch.full((1, 8), 0.5), weight, torch.tensor([2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_masked_arcface_logits_run_in_fp32_under_autocast():
    x, mask, weight, labels = (t.float() if t.is_floating_point() else t for t in arcface_inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = masked_arcface_logits(x.bfloat16(), mask.bfloat16(), weight, labels)
    assert logits.dtype == torch.float32
    reference = official_masked_arcface_logits(
        x.bfloat16().double(), mask.bfloat16().double(), weight.double(), labels, 30.0, 0.5, False
    )
    torch.testing.assert_close(logits.double(), reference, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- batch-hard soft-margin triplet (dpm.md §6)


def brute_triplet(x, labels):
    losses = []
    for a in range(len(labels)):
        dist = [torch.sqrt(torch.clamp(((x[a] - x[j]) ** 2).sum(), min=1e-12)) for j in range(len(labels))]
        same = [j for j in range(len(labels)) if labels[j] == labels[a]]  # the anchor itself included
        positive = max((dist[j] for j in same), key=lambda d: d.item())
        negative = min((dist[j] for j in range(len(labels)) if j not in same), key=lambda d: d.item())
        losses.append(torch.log(1 + torch.exp(positive - negative)))
    return torch.stack(losses).mean()


def test_triplet_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=generator, **DOUBLE) * 4  # un-normalised on purpose
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    assert_same_value_and_grad(
        lambda x: SoftMarginTripletLoss()(x, labels), lambda x: brute_triplet(x, labels), (x,), atol=1e-7, rtol=1e-6
    )


def test_triplet_anchor_counts_as_its_own_positive():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [0.0, 10.0]], **DOUBLE)
    labels = torch.tensor([0, 0, 1, 1, 2])  # identity 2 appears once: its only positive is itself
    # d_ap = sqrt(1e-12) = 1e-6 for every anchor; d_an = 5, 5, 5, 5 and |(0,10) − (3,4)| = sqrt(45)
    d_an = torch.tensor([5.0, 5.0, 5.0, 5.0, math.sqrt(45.0)], **DOUBLE)
    expected = torch.nn.SoftMarginLoss()(d_an - 1e-6, torch.ones(5, **DOUBLE))
    torch.testing.assert_close(SoftMarginTripletLoss()(x, labels), expected)


# ---------------------------------------------------------------- HEM (dpm.md §4)


def brute_hem(a):
    batch, heads, patches = a.shape
    total = a.new_zeros(())
    for b in range(batch):
        rows = [a[b, h] / torch.sqrt((a[b, h] ** 2).sum() + 1e-6) for h in range(heads)]
        for i in range(heads):
            for j in range(heads):
                total = total + ((rows[i] * rows[j]).sum() - (1.0 if i == j else 0.0)) ** 2
    return total / heads**2


def test_hem_loss_matches_brute_force_summed_over_batch():
    a = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(0), **DOUBLE)
    assert_same_value_and_grad(lambda a: HEMLoss()(a), brute_hem, (a,))
    torch.testing.assert_close(hem_loss(a, reduction="mean"), brute_hem(a) / 3)


def test_hem_loss_extremes():
    identical_heads = torch.ones(3, 12, 20, **DOUBLE)
    # G = all ones: 132 off-diagonal ones per sample, / 144, summed over the batch of 3
    assert hem_loss(identical_heads).item() == pytest.approx(3 * 132 / 144, rel=1e-6)
    orthogonal = 10.0 * torch.eye(12, 20, **DOUBLE).expand(2, 12, 20)
    assert hem_loss(orthogonal).item() < 1e-14
    assert hem_loss(identical_heads.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="reduction"):
        hem_loss(orthogonal, reduction="none")


# ---------------------------------------------------------------- MaskReID ranking loss (maskreid.md §4.2)


def brute_ranking(x, labels, alpha=0.15, lam=2.0, neg_mode="literal", pos_mode="hardest"):
    n = len(labels)
    sim = [[(x[k] * x[j]).sum() for j in range(n)] for k in range(n)]
    per_anchor = []
    for k in range(n):
        positives = [i for i in range(n) if i != k and labels[i] == labels[k]]
        negatives = [j for j in range(n) if labels[j] != labels[k]]
        if not positives:
            continue
        if pos_mode == "eq4":  # Eq. 4 as printed: the double sum, no margin, hinge or pull
            summed = sum((torch.exp(sim[k][j] - sim[k][i]) for i in positives for j in negatives), x.new_zeros(()))
            per_anchor.append(torch.log(1 + summed))
            continue
        if pos_mode == "hardest":
            references = [min((sim[k][i] for i in positives), key=lambda d: d.item())]
        else:
            references = [sim[k][i] for i in positives]
        summed = x.new_zeros(())
        for reference in references:
            for j in negatives:
                z = sim[k][j] - reference + alpha
                if neg_mode == "literal":
                    summed = summed + torch.exp(torch.clamp(z, min=0))
                elif z > 0:
                    summed = summed + torch.exp(z)
        pull = sum((sim[k][i] - 1) ** 2 for i in positives) * lam / (2 * len(positives))
        per_anchor.append(torch.log(1 + summed) + pull)
    return torch.stack(per_anchor).mean()


def ranking_batch(seed=0):
    """The paper's batch shape, shrunk: one identity with 4 images, 6 single-image identities."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([7, 7, 7, 7, 1, 2, 3, 4, 5, 6])
    base = torch.randn(8, generator=generator, **DOUBLE)
    x = torch.randn(10, 8, generator=generator, **DOUBLE) * 0.6
    x[:4] += base  # positives close enough that some negatives satisfy the margin and some do not
    return F.normalize(x, dim=1), labels


@pytest.mark.parametrize(
    "neg_mode, pos_mode",
    [(n, p) for n in ("literal", "violating_only") for p in ("hardest", "all_eq5")] + [("literal", "eq4")],
)
def test_ranking_loss_matches_brute_force(neg_mode, pos_mode):
    for x, labels in (
        ranking_batch(),
        (F.normalize(torch.randn(9, 5, **DOUBLE), dim=1), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])),
    ):
        loss = MaskReIDRankingLoss(neg_mode=neg_mode, pos_mode=pos_mode)
        assert_same_value_and_grad(
            lambda x: loss(x, labels), lambda x: brute_ranking(x, labels, neg_mode=neg_mode, pos_mode=pos_mode), (x,)
        )


def test_ranking_loss_closed_form_gradient():
    """Spec §4.2's gradients: ∂L/∂s_kj = w_j, ∂L/∂s_k^{p*} = −Σ w_j, ∂L/∂s_ki += (λ/|P|)(s_ki − 1),
    averaged over anchors, then through S = X Xᵀ."""
    x, labels = ranking_batch(3)
    alpha, lam = 0.15, 2.0
    sim = x @ x.t()
    grad_sim = torch.zeros_like(sim)
    anchors = [k for k in range(10) if (labels == labels[k]).sum() > 1]
    for k in anchors:
        positives = [i for i in range(10) if i != k and labels[i] == labels[k]]
        negatives = [j for j in range(10) if labels[j] != labels[k]]
        hardest = min(positives, key=lambda i: sim[k, i].item())
        z = sim[k, negatives] - sim[k, hardest] + alpha
        w = torch.where(z > 0, torch.exp(z), torch.zeros_like(z)) / (1 + torch.exp(z.clamp_min(0)).sum())
        grad_sim[k, negatives] += w / len(anchors)
        grad_sim[k, hardest] -= w.sum() / len(anchors)
        for i in positives:
            grad_sim[k, i] += lam / len(positives) * (sim[k, i] - 1) / len(anchors)
    closed_form = (grad_sim + grad_sim.t()) @ x
    leaf = x.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(maskreid_ranking_loss(leaf, labels), leaf)
    assert closed_form.abs().max() > 1e-3
    torch.testing.assert_close(autograd, closed_form)


def test_ranking_loss_literal_floor_with_the_papers_batch():
    """10 images of one identity + 54 singletons, every constraint satisfied: the literal Eq. 5 stays
    at log(1 + 54) (only the 10 are anchors), the violating-only reading at 0."""
    x = torch.zeros(64, 4, **DOUBLE)
    x[:10, 0] = 1.0
    x[10:, 0] = -1.0
    labels = torch.cat([torch.zeros(10, dtype=torch.long), torch.arange(1, 55)])
    assert maskreid_ranking_loss(x, labels).item() == pytest.approx(math.log(55))
    assert maskreid_ranking_loss(x, labels, neg_mode="violating_only").item() == 0.0
    defaults = MaskReIDRankingLoss()
    assert (defaults.alpha, defaults.lam, defaults.neg_mode, defaults.pos_mode) == (0.15, 2.0, "literal", "hardest")
    with pytest.raises(ValueError, match="neg_mode"):
        MaskReIDRankingLoss(neg_mode="soft")
    with pytest.raises(ValueError, match="pos_mode 'all' was renamed 'all_eq5'"):
        MaskReIDRankingLoss(pos_mode="all")
    with pytest.raises(ValueError, match="neg_mode does not apply to pos_mode 'eq4'"):
        MaskReIDRankingLoss(neg_mode="violating_only", pos_mode="eq4")


@pytest.mark.parametrize("backend", [None, "reference"])
def test_loss_modules_refuse_negative_weights(backend):
    """Before: masked_weight=-5 gave a negative loss, lam=-2 pushed positives apart; 0 stays an ablation."""
    x, mask, weight, labels = arcface_inputs()
    with pytest.raises(
        ValueError,
        match=r"^masked_arcface_cross_entropy: masked_weight must be a finite number in \[0, 1e\+06\], got -5\.0$",
    ):
        MaskedArcFaceLoss(masked_weight=-5.0, backend=backend)(x, mask, weight, labels)
    embeddings, pairs = F.normalize(x[:4], dim=1), torch.tensor([0, 0, 1, 1])
    with pytest.raises(
        ValueError, match=r"^maskreid_ranking_loss: lam must be a finite number in \[0, 1e\+06\], got -2$"
    ):
        MaskReIDRankingLoss(lam=-2, backend=backend)(embeddings, pairs)
    without_pull = MaskReIDRankingLoss(lam=0, backend=backend)(embeddings, pairs)
    assert 0 < without_pull.item() < MaskReIDRankingLoss(backend=backend)(embeddings, pairs).item()


@pytest.mark.parametrize(
    "build, needle",
    [
        (
            lambda: MaskedArcFaceLoss(scale=-1),
            "masked_arcface_cross_entropy: scale must be a finite number in (0, 1e+06], got -1",
        ),
        (lambda: MaskedArcFaceLoss(easy_margin="no"), "easy_margin must be True or False, got 'no'"),
        (
            lambda: MaskReIDRankingLoss(lam=float("nan")),
            "maskreid_ranking_loss: lam must be a finite number in [0, 1e+06]",
        ),
        (lambda: DPMLoss(backend="bogus"), "DPMLoss: backend must be None or one of ('reference', 'cpp'"),
        (lambda: BaselineReIDLoss(backend=3), "BaselineReIDLoss: backend must be None or one of"),
        (lambda: HEMLoss(backend="cuda:0"), "HEMLoss: backend must be None or one of"),
        (lambda: MaskedArcFaceLoss(fused="no"), "MaskedArcFaceLoss: fused must be True or False, got 'no'"),
    ],
)
def test_loss_modules_check_their_options_when_built(build, needle):
    """They were found at the first batch (MaskedArcFaceLoss(scale=-1), a backend typo), or never: fused="no"
    read as true."""
    with pytest.raises(ValueError) as error:
        build()
    assert needle in str(error.value)


# ---------------------------------------------------------------- DPM total (dpm.md §6) and the baseline


LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 4, 4])


def fake_dpm_output(batch=8, classes=5, dim=12, heads=12, patches=30, seed=0):
    """A DPMTrainOutput of a model called with LABELS (``margin_labels``)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, **DOUBLE)

    return DPMTrainOutput(
        randn(batch, classes),
        randn(batch, classes) * 5,
        randn(batch, dim),
        torch.rand(batch, dim, generator=generator, **DOUBLE),
        randn(batch, heads, patches),
        LABELS[:batch],
    )


@pytest.mark.parametrize("hem_weight", [0.1, 0.01])
def test_dpm_loss_combines_terms_per_spec(hem_weight):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 4, 4])

    output = fake_dpm_output()

    def ours(plain, masked, feature, hem_logits):  # the mask enters through masked_logits only
        return DPMLoss(hem_weight=hem_weight)(
            DPMTrainOutput(plain, masked, feature, output.mask, hem_logits, labels), labels
        )

    def reference(plain, masked, feature, hem_logits):
        id_loss = (
            0.5 * brute_cross_entropy(plain, labels)
            + 0.5 * brute_cross_entropy(masked, labels)
            + hem_weight * brute_hem(hem_logits)
        )
        return id_loss + brute_triplet(feature, labels)

    inputs = (output.plain_logits, output.masked_logits, output.feature, output.hem_logits)
    assert_same_value_and_grad(ours, reference, inputs, atol=1e-7, rtol=1e-6)


def test_dpm_loss_defaults_terms_and_outer_weights():
    output, labels = fake_dpm_output(), torch.tensor([0, 0, 1, 1, 2, 2, 4, 4])
    criterion = DPMLoss()
    assert (criterion.hem_weight, criterion.id_weight, criterion.triplet_weight) == (0.1, 1.0, 1.0)
    terms = criterion.terms(output, labels)
    assert set(terms) == {"id_plain", "id_masked", "hem", "triplet"}
    weighted = DPMLoss(id_weight=2.0, triplet_weight=3.0)(output, labels)
    expected = 2.0 * (0.5 * terms["id_plain"] + 0.5 * terms["id_masked"] + 0.1 * terms["hem"]) + 3.0 * terms["triplet"]
    torch.testing.assert_close(weighted, expected)
    branches = DPMLoss(plain_weight=0.25, masked_weight=0.75)(output, labels)
    expected = 0.25 * terms["id_plain"] + 0.75 * terms["id_masked"] + 0.1 * terms["hem"] + terms["triplet"]
    torch.testing.assert_close(branches, expected)


def test_dpm_loss_refuses_logits_without_the_margin_of_its_labels():
    # A train output made without labels has no ArcFace margin in masked_logits, one made with other labels
    # has it on other targets: either trained a different loss, silently.
    output = fake_dpm_output()
    with pytest.raises(ValueError, match=r"^DPMLoss: the output's masked_logits carry no ArcFace margin"):
        DPMLoss()(output._replace(margin_labels=None), LABELS)
    with pytest.raises(ValueError, match=r"^DPMLoss: labels must be those the model was called with"):
        DPMLoss()(output, LABELS.flip(0))
    torch.testing.assert_close(DPMLoss()(output, LABELS.clone()), DPMLoss()(output, LABELS))


def test_dpm_loss_from_loss_inputs_takes_the_models_margin_and_the_branch_weights():
    features, mask, weight, labels = arcface_inputs()
    hem_logits = torch.randn(5, 2, 6, **DOUBLE)
    inputs = DPMLossInputs(features, mask, weight, features, hem_logits, 30.0, 0.3, False)
    terms = DPMLoss(plain_weight=0.25, masked_weight=0.75).terms(inputs, labels)
    masked = masked_arcface_logits(features, mask, weight, labels, 30.0, 0.3, False)
    expected = 0.25 * brute_cross_entropy(features @ weight.T, labels) + 0.75 * brute_cross_entropy(masked, labels)
    torch.testing.assert_close(terms["id"], expected)


def test_baseline_loss():
    generator = torch.Generator().manual_seed(0)
    logits, feature = torch.randn(6, 4, generator=generator, **DOUBLE), torch.randn(6, 8, generator=generator, **DOUBLE)
    labels = torch.tensor([0, 0, 1, 1, 3, 3])
    value = BaselineReIDLoss()(ViTBaselineTrainOutput(logits, feature), labels)
    torch.testing.assert_close(value, brute_cross_entropy(logits, labels) + brute_triplet(feature, labels))
    weighted = BaselineReIDLoss(id_weight=2.0, triplet_weight=3.0)(ViTBaselineTrainOutput(logits, feature), labels)
    torch.testing.assert_close(
        weighted, 2.0 * brute_cross_entropy(logits, labels) + 3.0 * brute_triplet(feature, labels)
    )


def test_arcface_logits_take_one_class_label_per_row():
    # labels for fewer rows than the cosine's were taken silently (the other rows kept no margin)
    cosine = torch.rand(4, 3, **DOUBLE) * 2 - 1
    for bad, message in (
        (torch.tensor([0, 1]), r"labels must be 1-D of length B = 4, got \(2,\)"),
        (torch.tensor([0, 1, 2, 3]), r"labels must lie in \[0, K = 3\)"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), "labels must be int64, got torch.float32"),
    ):
        with pytest.raises(ValueError, match=rf"^arcface_logits: {message}$"):
            arcface_logits(cosine, bad)
        with pytest.raises(ValueError, match=rf"^masked_arcface_logits: {message}$"):
            masked_arcface_logits(torch.randn(4, 5), torch.rand(4, 5), torch.randn(3, 5), bad)


def test_arcface_logits_take_finite_cosines():
    """NaN / inf gave NaN / inf logits, a cosine of 2 a target logit above a perfect match's (52.7 for 26.3)."""
    labels = torch.tensor([0])
    for value, message in (
        (float("nan"), "cosine contains non-finite values"),
        (float("inf"), "cosine contains non-finite values"),
        (2.0, r"cosine must hold cosines, in \[-1, 1\], got values in \[0.2, 2\]"),
    ):
        with pytest.raises(ValueError, match=rf"^arcface_logits: {message}"):
            arcface_logits(torch.tensor([[value, 0.2]]), labels)
    arcface_logits(torch.tensor([[1.005, -1.005]]).bfloat16(), labels)  # rounding past 1 is a cosine still


def test_the_id_cross_entropy_of_half_precision_logits_is_fp32():
    """Outside autocast, bf16 logits gave a bf16 cross entropy (29.0 for 28.88)."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 700, generator=generator) * 10).bfloat16()
    features, labels = torch.randn(8, 16, generator=generator).bfloat16(), torch.arange(8) // 2
    terms = BaselineReIDLoss().terms(ViTBaselineTrainOutput(logits, features), labels)
    assert terms["id"].dtype == torch.float32
    torch.testing.assert_close(terms["id"], F.cross_entropy(logits.float(), labels))


@pytest.mark.parametrize("make", [DPMLoss, BaselineReIDLoss])
def test_reid_losses_name_their_bad_weights_labels_and_outputs(make):
    # The cross entropies of the model's logits took torch's errors: a float label "expected target dtype",
    # one past the classes an IndexError (on CUDA a device-side assert), too few a batch_size mismatch.
    name = make.__name__
    # an int past float's range (10**400) compared below inf and escaped as float()'s OverflowError
    for weight, value in (
        ("id_weight", -1.0),
        ("triplet_weight", float("nan")),
        ("id_weight", "1"),
        ("id_weight", 10**400),
    ):
        with pytest.raises(ValueError, match=rf"^{name}: {weight} must be a finite number"):
            make(**{weight: value})
    output = fake_dpm_output() if make is DPMLoss else ViTBaselineTrainOutput(*fake_dpm_output()[:3:2])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 4, 4])
    for bad, message in (
        (labels.float(), "labels must be int64, got torch.float32"),
        (labels[:6], r"labels must be 1-D of length B = 8, got \(6,\)"),
        (labels + 1, r"labels must lie in \[0, K = 5\)"),
        (labels - 1, r"labels must lie in \[0, K = 5\)"),
        (labels.tolist(), "labels must be a torch.Tensor, got list"),
    ):
        with pytest.raises(ValueError, match=rf"^{name}: {message}$"):
            make()(output, bad)
    expected = "DPMTrainOutput or DPMLossInputs" if make is DPMLoss else "ViTBaselineTrainOutput"
    with pytest.raises(ValueError, match=rf"^{name}: output must be the model's train-mode {expected}, got Tensor$"):
        make()(output[0], labels)
    # the logits themselves: NaN gave a NaN loss; DPM's masked branch had none of the checks (a label past its
    # classes an IndexError, on CUDA a device-side assert); 3-D logits were torch's RuntimeError
    field = "plain_logits" if make is DPMLoss else "logits"
    nan = output[0].clone()
    nan[0, 0] = float("nan")
    for logits, message in (
        (nan, f"{field} contains non-finite values"),
        (
            output[0][..., None],
            rf"{field} must be \(B, K\) floating-point logits, got torch.float64 of shape \(8, 5, 1\)",
        ),
    ):
        with pytest.raises(ValueError, match=rf"^{name}: {message}"):
            make()(output._replace(**{field: logits}), labels)
    if make is DPMLoss:
        with pytest.raises(ValueError, match=r"^DPMLoss: labels must lie in \[0, K = 2\)"):
            make()(output._replace(masked_logits=output.masked_logits[:, :2]), labels)


def _autocast_cases():
    gen = torch.Generator().manual_seed(5)
    features, mask, weight = torch.randn(6, 16, generator=gen), torch.rand(6, 16, generator=gen), torch.randn(4, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    logits = torch.randn(3, 2, 9, generator=gen)
    return {
        "masked_arcface_cross_entropy": lambda b: masked_arcface_cross_entropy(
            features, mask, weight, labels, backend=b
        ),
        "batch_hard_soft_margin_triplet": lambda b: batch_hard_soft_margin_triplet(features, labels, backend=b),
        "hem_loss": lambda b: hem_loss(logits, backend=b),
        "maskreid_ranking_loss": lambda b: maskreid_ranking_loss(F.normalize(features, dim=1), labels, backend=b),
    }


@pytest.mark.parametrize("name", sorted(_autocast_cases()))
def test_reference_losses_keep_fp32_under_autocast(name, monkeypatch):
    # Before: backend="reference" ran its matmuls in bf16 under autocast (the fused paths did not).
    call = _autocast_cases()[name]
    ran = record_kernels(monkeypatch)
    expected = call("reference")
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(call("reference"), expected)
    assert ran == []  # the reference ran, no kernel: an fp32 kernel in its place would pass the check above


def test_arcface_logits_check_their_options_and_cosine():
    """arcface_logits checked none of its options: a NaN scale gave NaN logits, scale -30 flipped them,
    easy_margin="no" read as true, clamp_eps 2 was taken, integer cosines too; masked_arcface_logits with a string
    scale was a raw TypeError."""
    cosine, labels = torch.rand(4, 5) * 2 - 1, torch.tensor([0, 1, 2, 3])
    for options, message in (
        (dict(scale=float("nan")), r"scale must be a finite number in \(0, 1e\+06\], got nan"),
        (dict(scale=-30.0), r"scale must be a finite number in \(0, 1e\+06\], got -30\.0"),
        (dict(margin="0.5"), "margin must be a finite number"),
        (dict(easy_margin="no"), "easy_margin must be True or False, got 'no'"),
        (dict(clamp_eps=2.0), r"clamp_eps must lie in \[0, 1\), got 2\.0"),
    ):
        with pytest.raises(ValueError, match=f"^arcface_logits: {message}"):
            arcface_logits(cosine, labels, **options)
    with pytest.raises(ValueError, match=r"^arcface_logits: cosine must be 2-D \(B, K\) floating point"):
        arcface_logits(cosine.long(), labels)
    features, mask, weight = torch.randn(4, 8), torch.rand(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"^masked_arcface_logits: scale must be a finite number in \(0, 1e\+06\]"):
        masked_arcface_logits(features, mask, weight, None, scale="30")


def test_loss_helpers_check_their_arguments():
    """HEMLoss(eps=0) was built and failed at its first batch; pairwise_euclidean of a 1-D tensor was an
    IndexError, of a list an AttributeError, of features of 1e20 a matrix of NaN; sgd_param_groups took a NaN or
    negative lr (SGD then stepped every weight to NaN) and a string one was a TypeError."""
    for eps in (0, "x"):
        with pytest.raises(ValueError, match="^HEMLoss: eps must be a finite number > 0"):
            HEMLoss(eps=eps)
    for features in (torch.randn(3), [[1.0, 2.0]], torch.ones(3, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match="^pairwise_euclidean: features must be"):
            pairwise_euclidean(features)
    with pytest.raises(ValueError, match="^pairwise_euclidean: features is too large in magnitude"):
        pairwise_euclidean(torch.randn(3, 2) * 1e20)
    model = torch.nn.Linear(3, 2)
    for options, message in (
        (dict(base_lr=float("nan")), r"base_lr must be a finite number > 0"),
        (dict(base_lr=-1.0), r"base_lr must be a finite number > 0"),
        (dict(base_lr="0.1"), r"base_lr must be a finite number > 0"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
        (dict(bias_lr_factor=-2), "bias_lr_factor must be a finite number >= 0"),
        (dict(weight_decay_bias=-1e-4), "weight_decay_bias must be a finite number >= 0"),
    ):
        with pytest.raises(ValueError, match=f"^sgd_param_groups: {message}"):
            sgd_param_groups(model.named_parameters(), **options)


@pytest.mark.parametrize("make", [DPMLoss, BaselineReIDLoss])
def test_the_triplet_mines_over_the_batch_triplet_batch_gives(make):
    output = fake_dpm_output() if make is DPMLoss else ViTBaselineTrainOutput(*fake_dpm_output()[:3:2])
    doubled = make(triplet_batch=lambda f, l: (torch.cat([f, f + 1]), torch.cat([l, l + 5])))
    expected = batch_hard_soft_margin_triplet(
        torch.cat([output.feature, output.feature + 1]), torch.cat([LABELS, LABELS + 5])
    )
    torch.testing.assert_close(doubled.terms(output, LABELS)["triplet"], expected)
    with pytest.raises(ValueError, match=rf"^{make.__name__}: triplet_batch must be None or a callable, got int$"):
        make(triplet_batch=3)
    assert pickle.loads(pickle.dumps(make())).triplet_weight == 1.0  # torch.save of a module, other processes


def test_the_ranking_loss_mines_over_the_batch_ranking_batch_gives():
    embeddings = F.normalize(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    doubled = MaskReIDRankingLoss(ranking_batch=lambda e, l: (torch.cat([e, -e]), torch.cat([l, l + 5])), lam=1.0)
    expected = maskreid_ranking_loss(torch.cat([embeddings, -embeddings]), torch.cat([LABELS, LABELS + 5]), lam=1.0)
    torch.testing.assert_close(doubled(embeddings, LABELS), expected)
    assert not torch.allclose(expected, maskreid_ranking_loss(embeddings, LABELS, lam=1.0))  # another batch's loss
    with pytest.raises(ValueError, match=r"^MaskReIDRankingLoss: ranking_batch must be None or a callable, got int$"):
        MaskReIDRankingLoss(ranking_batch=3)
    assert pickle.loads(pickle.dumps(MaskReIDRankingLoss())).lam == 2.0  # torch.save of a module, other processes
