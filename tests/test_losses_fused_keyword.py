"""The losses' ``fused=`` keyword, deprecated for ``backend=``: one release where it still works, warns,
and means what it meant (fused=True: backend=None, fused=False: backend="reference")."""

import pytest
import torch

from dpm_ops.losses import (
    BaselineReIDLoss,
    DPMLoss,
    HEMLoss,
    MaskedArcFaceLoss,
    MaskReIDRankingLoss,
    SoftMarginTripletLoss,
    batch_hard_soft_margin_triplet,
    hem_loss,
    masked_arcface_cross_entropy,
    maskreid_ranking_loss,
)


def test_loss_functions_map_fused_onto_backend():
    gen = torch.Generator().manual_seed(0)
    features, labels = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mask, weight = torch.rand(8, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    calls = [
        (masked_arcface_cross_entropy, (features, mask, weight, labels)),
        (batch_hard_soft_margin_triplet, (features, labels)),
        (maskreid_ranking_loss, (torch.nn.functional.normalize(features, dim=1), labels)),
        (hem_loss, (features.view(2, 4, 6),)),
    ]
    for loss, inputs in calls:
        for fused, backend in ((True, None), (False, "reference")):
            with pytest.warns(DeprecationWarning, match="backend='reference' instead of fused=False"):
                old = loss(*inputs, fused=fused)
            assert torch.equal(old, loss(*inputs, backend=backend)), loss.__name__
        with pytest.raises(TypeError, match="pass backend= alone"):
            loss(*inputs, fused=False, backend="reference")


@pytest.mark.parametrize("module", [MaskedArcFaceLoss, SoftMarginTripletLoss, MaskReIDRankingLoss, HEMLoss, DPMLoss])
def test_loss_modules_map_fused_onto_backend(module):
    with pytest.warns(DeprecationWarning, match="fused= is deprecated"):
        assert module(fused=False).backend == "reference"
    with pytest.warns(DeprecationWarning, match="fused= is deprecated"):
        assert module(fused=True).backend is None
    assert module().backend is None and "backend=None" in repr(module())
    # attributed to this line, so Python's default filters show it (HEMLoss / MaskReIDRankingLoss hid it)
    with pytest.warns(DeprecationWarning) as caught:
        module(fused=False)
    assert caught[0].filename == __file__
    with pytest.raises(TypeError, match="pass backend= alone"):  # DPMLoss dropped backend= silently
        module(fused=True, backend="reference")


def test_loss_module_options_are_the_functions():
    loss = MaskedArcFaceLoss(margin=0.3)
    assert (loss.scale, loss.margin, loss.backend) == (30.0, 0.3, None)
    with pytest.warns(DeprecationWarning, match=r"\.fused is deprecated") as caught:
        assert loss.fused
    assert caught[0].filename == __file__  # attributed to the line that read it
    with pytest.raises(TypeError):
        MaskedArcFaceLoss(marign=0.3)


def test_reid_losses_pass_their_backend_to_every_term(monkeypatch):
    # DPMLoss ran its HEM term on the default backend whatever backend= said; BaselineReIDLoss took none
    import dpm_ops.losses.reid_losses as reid_losses

    seen = []
    for name in ("hem_loss", "batch_hard_soft_margin_triplet"):
        original = getattr(reid_losses, name)
        monkeypatch.setattr(
            reid_losses, name, lambda *a, _f=original, _n=name, **k: seen.append((_n, k.get("backend"))) or _f(*a, **k)
        )
    gen = torch.Generator().manual_seed(1)
    output = type("Out", (), {})()
    output.feature, output.logits = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
    labels = torch.tensor([0, 0, 1, 1])
    BaselineReIDLoss(backend="reference")(output, labels)
    assert seen == [("batch_hard_soft_margin_triplet", "reference")]
