"""Pictures of an evaluation: the CMC curve, the best and worst ranked lists and, for DPM, its
channel masks projected back onto the patches."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from dpm_ops.data import ReIDSplits

from .extraction import FeatureSet, unwrap_ddp


CMC_PICTURE, MASKS_PICTURE = "cmc.png", "masks.png"
PICTURES = (CMC_PICTURE, "ranked_best.png", "ranked_worst.png", MASKS_PICTURE)  # what write_pictures may write


def write_pictures(
    out_dir: str,
    metrics: dict,
    distmat,
    query: FeatureSet,
    gallery: FeatureSet,
    subsets: dict,
    *,
    model=None,
    splits: Optional[ReIDSplits] = None,
    model_name: str = "",
    transform=None,
    device="cpu",
    num_queries: int = 8,
    top_k: int = 10,
) -> None:
    """cmc.png, ranked_best.png, ranked_worst.png and, for a model with channel masks (DPM),
    masks.png in ``out_dir``."""
    from dpm_ops import visualize  # matplotlib only when pictures are asked for

    dataset = f" on {splits.name}" if splits is not None else ""
    visualize.plot_cmc(metrics, os.path.join(out_dir, CMC_PICTURE), title=f"CMC: {model_name}{dataset}")
    occluded = None
    if subsets:
        occluded = np.zeros(len(query), dtype=bool)
        occluded[subsets["occluded"].numpy()] = True
    dist_np = distmat.detach().float().cpu().numpy()
    for which in ("best", "worst"):
        visualize.plot_ranked_lists(
            query.paths,
            gallery.paths,
            dist_np,
            query.pids.numpy(),
            gallery.pids.numpy(),
            query.camids.numpy(),
            gallery.camids.numpy(),
            out_png=os.path.join(out_dir, f"ranked_{which}.png"),
            which=which,
            num_queries=num_queries,
            top_k=top_k,
            q_occluded=occluded,
        )
    if query.masks is not None and model is not None:
        rows = _mask_examples(occluded, len(query), num_queries)
        token_maps = dpm_token_maps(
            model, [query.paths[i] for i in rows], query.camids[rows], query.masks[rows], transform, device
        )
        visualize.plot_mask_heatmaps(
            [query.paths[i] for i in rows],
            query.masks[rows].numpy(),
            os.path.join(out_dir, MASKS_PICTURE),
            token_maps=token_maps,
            all_masks=query.masks.numpy(),
            occluded=None if occluded is None else occluded[rows],
            all_occluded=occluded,
        )


def _mask_examples(occluded: Optional[np.ndarray], num_query: int, count: int) -> np.ndarray:
    """Evenly spread queries; half occluded, half clean when the dataset says which."""
    if occluded is None:
        return np.unique(np.linspace(0, num_query - 1, min(count, num_query)).round().astype(np.int64))
    picks = []
    for group, share in ((np.flatnonzero(occluded), count - count // 2), (np.flatnonzero(~occluded), count // 2)):
        if len(group):
            picks.append(group[np.unique(np.linspace(0, len(group) - 1, min(share, len(group))).round().astype(int))])
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def dpm_token_maps(
    model, paths: Sequence[str], camids: torch.Tensor, masks: torch.Tensor, transform, device="cpu"
) -> np.ndarray:
    """(B, H_p, W_p) share of each final-LayerNorm patch token's energy that lies in the channels
    its image's mask keeps, relative to the mask's average: ``Σ_c m_c² t_c² / (Σ_c t_c² · mean_c m_c²)``.

    1 everywhere for a flat mask; > 1 where a patch's features sit in the kept channels, < 1 where
    they sit in the suppressed ones. DPM itself never computes a spatial map (the mask is a channel
    mask over the C feature channels); this projects the channel mask back onto the patches for inspection only.
    """
    from dpm_ops.data.image_io import read_image

    model = unwrap_ddp(model)
    device = torch.device(device)
    images = torch.stack([transform(read_image(path)) for path in paths]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            backbone = model.backbone
            last = len(backbone.blocks) - 1
            feats = backbone.forward_features(images, camids.to(device), (last,))
            tokens = backbone.norm(feats.tapped_tokens[0]).float()  # (B, N, C)
    finally:
        model.train(was_training)
    m2 = masks.to(device).float().square()[:, None, :]  # (B, 1, C)
    energy = tokens.square()
    share = (energy * m2).sum(-1) / energy.sum(-1).clamp_min(1e-12) / m2.mean(-1).clamp_min(1e-12)
    return share.reshape(len(paths), *backbone.grid_size).cpu().numpy()
