"""Minimal evaluation used only while ``dpm_ops.engine.evaluator`` (the evaluation engine) is absent.

Features with the test transforms, each model's distance (DPM: query-masked arccos; baseline:
Euclidean on L2-normalised features; MaskReID: cosine), ``evaluate_rank`` on all queries and on the
clean / occluded subsets. Single process: under DDP only rank 0 calls it.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from dpm_ops.data import ImageDataset, build_dataloader, build_transforms
from dpm_ops.evaluation import evaluate_rank, pairwise_distance
from dpm_ops.ops import masked_arccos_distance


@torch.no_grad()
def _extract(model, records, transform, mask_paths, model_name, batch_size, device, amp_dtype):
    loader = build_dataloader(ImageDataset(records, transform, mask_paths), batch_size=batch_size)
    feats, masks = [], []
    for batch in loader:
        images = batch["image"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if model_name.startswith("maskreid"):
                out = model(images, batch["masked"].to(device))
            else:
                out = model(images, batch["camid"].to(device))
        if model_name == "dpm":
            feats.append(out.feature.float())
            masks.append(out.mask.float())
        else:
            feats.append(out.float())
    return torch.cat(feats), (torch.cat(masks) if masks else None)


def evaluate_model(model, splits, *, model_name, image_size=(256, 128), batch_size=128, num_workers=0,
                   device="cpu", amp_dtype=None, distance="auto", rerank=False, k1=20, k2=6,
                   lambda_value=0.3, max_rank=50, out_dir=None, pictures=True, progress=True, **_ignored):
    device = torch.device(device)
    was_training = model.training
    model.eval()
    recipe = "maskreid" if model_name.startswith("maskreid") else "dpm"
    options = {"size": tuple(image_size)} if recipe == "dpm" else {"crop": tuple(image_size)}
    transform = build_transforms(recipe, train=False, **options)
    mask_paths = splits.mask_paths if recipe == "maskreid" else None
    q, qm = _extract(model, splits.query, transform, mask_paths, model_name, batch_size, device, amp_dtype)
    g, _ = _extract(model, splits.gallery, transform, mask_paths, model_name, batch_size, device, amp_dtype)
    model.train(was_training)
    if model_name == "dpm":
        dist = masked_arccos_distance(F.normalize(q, dim=1), qm, F.normalize(g, dim=1))
    elif model_name == "vit_baseline":
        dist = pairwise_distance(F.normalize(q, dim=1), F.normalize(g, dim=1), metric="euclidean")
    else:
        dist = pairwise_distance(q, g, metric="cosine")
    q_pids = torch.tensor([r.pid for r in splits.query])
    q_cams = torch.tensor([r.camid for r in splits.query])
    g_pids = torch.tensor([r.pid for r in splits.gallery])
    g_cams = torch.tensor([r.camid for r in splits.gallery])

    def summary(rows):
        result = evaluate_rank(dist[rows], q_pids[rows], g_pids, q_cams[rows], g_cams, max_rank=max_rank)
        return {"rank1": 100 * float(result.cmc[0]), "rank5": 100 * float(result.cmc[min(4, max_rank - 1)]),
                "rank10": 100 * float(result.cmc[min(9, max_rank - 1)]), "mAP": 100 * result.mAP,
                "mINP": 100 * result.mINP, "num_query": int(len(rows))}

    metrics = {"all": summary(torch.arange(len(splits.query)))}
    flags = [splits.is_occluded(r) for r in splits.query]
    if flags and flags[0] is not None:
        occluded = torch.tensor(flags)
        for name, rows in (("clean", (~occluded).nonzero().flatten()), ("occluded", occluded.nonzero().flatten())):
            if len(rows):
                metrics[name] = summary(rows)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=1)
    return metrics


def format_metrics_table(metrics: dict) -> str:
    lines = [f"{'queries':<10}{'n':>6}{'Rank-1':>9}{'Rank-5':>9}{'Rank-10':>9}{'mAP':>8}{'mINP':>8}"]
    for name in ("all", "clean", "occluded"):
        if name in metrics:
            m = metrics[name]
            lines.append(f"{name:<10}{m['num_query']:>6}{m['rank1']:>9.1f}{m['rank5']:>9.1f}{m['rank10']:>9.1f}"
                         f"{m['mAP']:>8.1f}{m['mINP']:>8.1f}")
    return "\n".join(lines)
