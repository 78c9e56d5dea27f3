"""The losses' ``fused=`` keyword, deprecated for ``backend=``: one release where it still works, warns,
and means what it meant (fused=True: backend=None, fused=False: backend="reference")."""

import pytest
import torch

from dpm_ops.losses import (
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


def test_loss_module_options_are_the_functions():
    loss = MaskedArcFaceLoss(margin=0.3)
    assert (loss.scale, loss.margin, loss.backend) == (30.0, 0.3, None)
    with pytest.warns(DeprecationWarning, match=r"\.fused is deprecated"):
        assert loss.fused
    with pytest.raises(TypeError):
        MaskedArcFaceLoss(marign=0.3)
