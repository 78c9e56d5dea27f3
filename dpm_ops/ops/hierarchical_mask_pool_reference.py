"""Plain-PyTorch reference of the hierarchical masked pooling (the executable specification).

For each level x_l (B, C_l, H_l, W_l):

* the foreground mask (B, 1, H, W), if given, is resized to (H_l, W_l) by area averaging
  (``adaptive_avg_pool2d``: each level cell gets the fraction of its input area that is foreground,
  exact for MaskReID's 144x56 input over its 36x14, 18x7, 9x4 levels), giving weights w;
* ``avg``: ``v = Σ_hw w·x / Σ_hw w`` (0 when Σ w = 0); ``max``: the max of x over the cells with
  w > 0 (0 when there is none). Without a mask, w ≡ 1: plain global average / max pooling
  (MaskReID's skipped fusing layer, which pools several backbone stages; DPM's Hierarchical Mask
  Generator, which max-pools its masked maps).

The vectors are concatenated along channels: (B, Σ C_l). The mask is a constant weight (no gradient).
"""

import torch
import torch.nn.functional as F


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """The mask's area average over each cell of a (H_l, W_l) grid: (B, 1, H_l, W_l)."""
    return F.adaptive_avg_pool2d(mask, tuple(size))


def hierarchical_mask_pool_reference(features, mask=None, mode: str = "avg") -> torch.Tensor:
    vectors = []
    for x in (f.float() if f.element_size() < 4 else f for f in features):  # half precision: in float32
        if mask is None:
            vectors.append(x.amax((2, 3)) if mode == "max" else x.mean((2, 3)))
            continue
        w = resize_mask(mask.detach().to(x.dtype), x.shape[-2:])  # a float16 mask's small averages underflowed
        total = w.sum((2, 3))  # (B, 1)
        if mode == "max":
            v = x.masked_fill(w <= 0, float("-inf")).amax((2, 3))
        else:
            v = (x * w).sum((2, 3)) / torch.where(total > 0, total, torch.ones_like(total))
        vectors.append(torch.where(total > 0, v, torch.zeros_like(v)))
    return torch.cat(vectors, 1).to(features[0].dtype)
