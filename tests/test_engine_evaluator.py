"""Evaluation engine on a tiny synthetic occluded set with tiny random DPM / ViT / MaskReID models."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dpm_ops.data import ImageDataset, build_dataloader, build_dataset
from dpm_ops.data.synth import ensure_synthetic_dataset
from dpm_ops.engine import evaluator, extraction
from dpm_ops.engine.evaluator import (
    FeatureSet,
    compute_distances,
    evaluate_model,
    extract_features,
    format_metrics_table,
    pool_multi_query,
    query_subsets,
)
from dpm_ops.evaluation import (
    alpha_query_expansion,
    evaluate_rank,
    gnn_rerank,
    pairwise_distance,
    re_ranking,
    rerank_features,
    tpr_at_fpr,
)
from dpm_ops.models import build_model
from dpm_ops.ops import masked_arccos_distance
from conftest import record_figures
from dpm_ops.engine.pictures import _mask_examples
from engine_utils import tiny_synth_config

CONFIG = tiny_synth_config(
    seed=5, ids=14, train_images=(2, 2), distractors=0.2, query_occlusion=0.5, gallery_occlusion=0.2
)
VIT = dict(embed_dim=32, depth=4, num_heads=4, patch_size=8, stride=8, img_size=(64, 32), drop_path_rate=0.0)
SIZE = {"dpm": (64, 32), "vit_baseline": (64, 32), "maskreid": None}
METRIC_KEYS = {"rank1", "rank5", "rank10", "mAP", "mINP", "num_query", "num_valid", "cmc"}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return str(ensure_synthetic_dataset(tmp_path_factory.mktemp("synth") / "set", CONFIG, progress=False))


@pytest.fixture(scope="module")
def splits(dataset_root):
    return build_dataset("synthetic", dataset_root, with_masks=True)


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "dpm":
        model = build_model("dpm", 7, 3, mask_tap_blocks=(0, 1, 2, 3), **VIT)
        # the zero-initialised attfc gives m = 0.5 everywhere (plain cosine); make the masks vary
        torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.5)
        torch.nn.init.normal_(model.mask_generator.attfc.bias, std=1.0)
        return model
    if name == "vit_baseline":
        return build_model("vit_baseline", 7, 3, **VIT)
    return build_model(name, 0, stem_channels=4, base_width=4)


def loader_for(splits, records, name):
    transform = evaluator.eval_transform(name, SIZE[name])
    masks = splits.mask_paths if name == "maskreid" else None
    return build_dataloader(ImageDataset(records, transform, mask_paths=masks), batch_size=5)


def direct_metrics(distmat, query, gallery, rows=None):
    q_pids, q_camids = query.pids, query.camids
    if rows is not None:
        distmat, q_pids, q_camids = distmat[rows], q_pids[rows], q_camids[rows]
    return evaluate_rank(distmat, q_pids, gallery.pids, q_camids, gallery.camids)


def flat(metrics: dict) -> dict:
    """{(subset, key, i): number} so pytest.approx can compare nested metrics."""
    out = {}
    for subset, values in metrics.items():
        for key, value in values.items():
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                out[subset, key, i] = v
    return out


def assert_same(metrics: dict, result, num_query: int):
    assert metrics["rank1"] == pytest.approx(100 * result.cmc[0])
    assert metrics["rank5"] == pytest.approx(100 * result.cmc[4])
    assert metrics["rank10"] == pytest.approx(100 * result.cmc[9])
    assert metrics["mAP"] == pytest.approx(100 * result.mAP)
    assert metrics["mINP"] == pytest.approx(100 * result.mINP)
    assert metrics["cmc"] == pytest.approx(list(100 * result.cmc))
    assert metrics["num_valid"] == result.num_valid and metrics["num_query"] == num_query


# ------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("name", ["dpm", "vit_baseline", "maskreid"])
def test_extract_features_follows_the_test_recipe(splits, name):
    model = tiny_model(name).train()
    records = splits.query[:7]
    features = extract_features(model, loader_for(splits, records, name), model_name=name, progress=False)
    assert model.training  # mode restored
    assert features.features.dtype == torch.float32 and features.features.shape[0] == 7
    assert features.paths == [r.path for r in records]
    assert features.pids.tolist() == [r.pid for r in records]
    assert features.camids.tolist() == [r.camid for r in records]
    assert torch.allclose(features.features.norm(dim=1), torch.ones(7), atol=1e-5)
    # the same images through the model by hand: eval mode, no flip, L2-normalised descriptor
    batch = next(iter(loader_for(splits, records, name)))
    with torch.no_grad():
        model.eval()
        if name == "maskreid":
            expected, mask = model(batch["image"], batch["masked"]), None
        elif name == "dpm":
            expected, mask = model(batch["image"], cam_label=batch["camid"])
        else:
            expected, mask = model(batch["image"], cam_label=batch["camid"]), None
    assert torch.allclose(features.features[:5], F.normalize(expected, dim=1), atol=1e-5)
    if name == "dpm":
        assert features.masks.shape == features.features.shape
        assert torch.allclose(features.masks[:5], mask, atol=1e-6)
        assert features.masks.std() > 0.05
    else:
        assert features.masks is None


@pytest.mark.parametrize("name", ["dpm", "vit_baseline", "maskreid"])
def test_flip_averages_each_image_with_its_mirror(splits, name):
    # fast-reid's TEST.FLIP: the outputs of the image and of its left-right mirror averaged, then normalised
    model = tiny_model(name)
    loader = loader_for(splits, splits.query[:5], name)
    flipped = extract_features(model, loader, model_name=name, flip=True, progress=False)
    batch = next(iter(loader))
    with torch.no_grad():
        model.eval()
        if name == "maskreid":
            outputs = [(model(batch["image"], batch["masked"]), None)]
            outputs.append((model(batch["image"].flip(3), batch["masked"].flip(3)), None))
        else:
            outputs = [model(image, cam_label=batch["camid"]) for image in (batch["image"], batch["image"].flip(3))]
            outputs = outputs if name == "dpm" else [(feature, None) for feature in outputs]
    expected = F.normalize((outputs[0][0] + outputs[1][0]) / 2, dim=1)
    torch.testing.assert_close(flipped.features, expected, rtol=0, atol=1e-5)
    plain = extract_features(model, loader, model_name=name, progress=False)
    assert not torch.allclose(flipped.features, plain.features, atol=1e-3)  # the mirror changed them
    if name == "dpm":
        torch.testing.assert_close(flipped.masks, (outputs[0][1] + outputs[1][1]) / 2, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"^flip must be True or False, got 1"):
        extract_features(model, loader, model_name=name, flip=1, progress=False)


def test_evaluation_with_flip(splits, tmp_path):
    model = tiny_model("dpm")
    q, g = (
        extract_features(model, loader_for(splits, records, "dpm"), model_name="dpm", flip=True, progress=False)
        for records in (splits.query, splits.gallery)
    )
    options = dict(image_size=(64, 32), batch_size=8, pictures=False, progress=False, out_dir=tmp_path)
    metrics = evaluate_model(model, splits, model_name="dpm", flip=True, **options)
    assert_same(metrics["all"], direct_metrics(masked_arccos_distance(q.features, q.masks, g.features), q, g), len(q))
    assert json.loads((tmp_path / "metrics.json").read_text())["settings"]["flip"] is True
    with pytest.raises(ValueError, match=r"^flip must be True or False, got 'on'"):  # before any extraction
        evaluate_model(model, splits, model_name="dpm", flip="on", **options)


def test_vit_models_are_evaluated_at_their_own_input_size(splits):
    """image_size=None took the recipe's 256x128, so a smaller ViT model (the synthetic configs' 128x64) failed in
    its forward; it is the model's own size now, and another explicit size a ValueError before any extraction."""
    model = tiny_model("vit_baseline")
    options = dict(batch_size=8, pictures=False, progress=False)
    default = evaluate_model(model, splits, model_name="vit_baseline", **options)
    explicit = evaluate_model(model, splits, model_name="vit_baseline", image_size=(64, 32), **options)
    assert default == explicit
    with pytest.raises(ValueError, match=r"image_size \(128, 64\) differs from the model's input size \(64, 32\)"):
        evaluate_model(model, splits, model_name="vit_baseline", image_size=(128, 64), **options)


def test_extraction_does_not_depend_on_batch_size_or_workers(splits):
    # eval.batch_size and eval.num_workers: workers load the same batches in order; another batch size
    # blocks the model's GEMMs differently, which moves the float32 features by a rounding error only.
    model = tiny_model("dpm")
    dataset = ImageDataset(splits.gallery[:12], evaluator.eval_transform("dpm", SIZE["dpm"]))

    def extract(batch_size, num_workers=0):
        loader = build_dataloader(dataset, batch_size=batch_size, num_workers=num_workers)
        return extract_features(model, loader, model_name="dpm", progress=False)

    by_five, whole = extract(5), extract(256)
    with_workers = extract(5, num_workers=2)
    assert torch.equal(with_workers.features, by_five.features) and torch.equal(with_workers.masks, by_five.masks)
    assert with_workers.paths == whole.paths
    for one_by_one in (by_five, extract(1)):
        torch.testing.assert_close(one_by_one.features, whole.features, rtol=0, atol=1e-6)
        torch.testing.assert_close(one_by_one.masks, whole.masks, rtol=0, atol=1e-6)


def test_extract_features_errors(splits):
    model = tiny_model("vit_baseline")
    loader = loader_for(splits, splits.query[:3], "vit_baseline")
    with pytest.raises(ValueError, match="model_name"):
        extract_features(model, loader, model_name="transreid", progress=False)
    with pytest.raises(ValueError, match="move the model first"):  # the model is on the CPU
        extract_features(model, loader, model_name="vit_baseline", device="cuda", progress=False)
    small = build_model("vit_baseline", 7, 2, **VIT)  # two camera embeddings, the set has three
    with pytest.raises(ValueError, match="camera id 2"):
        extract_features(
            small,
            loader_for(splits, [r for r in splits.query if r.camid == 2][:2], "vit_baseline"),
            model_name="vit_baseline",
            progress=False,
        )
    with pytest.raises(ValueError, match="paired"):
        extract_features(
            tiny_model("maskreid"), loader_for(splits, splits.query[:2], "dpm"), model_name="maskreid", progress=False
        )


# ------------------------------------------------------------------------------------ evaluate_model


@pytest.mark.parametrize("name", ["dpm", "vit_baseline", "maskreid"])
def test_evaluate_model_equals_direct_evaluate_rank(splits, name, tmp_path):
    model = tiny_model(name)
    metrics = evaluate_model(
        model,
        splits,
        model_name=name,
        image_size=SIZE[name],
        batch_size=6,
        out_dir=str(tmp_path),
        pictures=False,
        progress=False,
    )
    assert set(metrics) == {"all", "clean", "occluded"}
    for values in metrics.values():
        assert set(values) == METRIC_KEYS and len(values["cmc"]) == min(50, len(splits.gallery))  # cut to G
        assert 0 <= values["rank1"] <= values["rank5"] <= values["rank10"] <= 100
    subsets = query_subsets(splits, splits.query)
    assert metrics["clean"]["num_query"] + metrics["occluded"]["num_query"] == len(splits.query)
    assert metrics["occluded"]["num_query"] == sum(bool(splits.is_occluded(r)) for r in splits.query) > 0

    query = extract_features(model, loader_for(splits, splits.query, name), model_name=name, progress=False)
    gallery = extract_features(model, loader_for(splits, splits.gallery, name), model_name=name, progress=False)
    if name == "dpm":  # the query-masked arccos distance of dpm.md §3.1
        distmat = masked_arccos_distance(query.features, query.masks, gallery.features)
    else:  # Euclidean distance of the L2-normalised descriptors
        distmat = pairwise_distance(query.features, gallery.features, "euclidean")
    assert_same(metrics["all"], direct_metrics(distmat, query, gallery), len(splits.query))
    for subset in ("clean", "occluded"):
        rows = subsets[subset]
        assert_same(metrics[subset], direct_metrics(distmat, query, gallery, rows), len(rows))

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert flat({k: v for k, v in saved.items() if k != "settings"}) == pytest.approx(flat(metrics))
    assert saved["settings"]["distance"] == ("masked_arccos" if name == "dpm" else "euclidean")
    assert saved["settings"]["image_size"] == ([144, 56] if name == "maskreid" else list(SIZE[name]))  # the crop
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_rerank_path(splits):
    dpm, vit = tiny_model("dpm"), tiny_model("vit_baseline")
    options = dict(image_size=(64, 32), batch_size=8, pictures=False, progress=False, k1=6, k2=3, lambda_value=0.4)
    dpm_metrics = evaluate_model(dpm, splits, model_name="dpm", rerank=True, **options)
    vit_metrics = evaluate_model(vit, splits, model_name="vit_baseline", rerank=True, **options)

    q = extract_features(dpm, loader_for(splits, splits.query, "dpm"), model_name="dpm", progress=False)
    g = extract_features(dpm, loader_for(splits, splits.gallery, "dpm"), model_name="dpm", progress=False)
    # The masked distance is asymmetric; DPM's path re-ranks it with each item's own row (mask).
    q_g, q_q, g_g = (
        masked_arccos_distance(q.features, q.masks, g.features),
        masked_arccos_distance(q.features, q.masks, q.features),
        masked_arccos_distance(g.features, g.masks, g.features),
    )
    assert not torch.allclose(g_g, g_g.T)
    expected = re_ranking(q_g, q_q.T, g_g.T, k1=6, k2=3, lambda_value=0.4)  # the reference reads columns
    assert torch.equal(expected, re_ranking(q_g, q_q, g_g, k1=6, k2=3, lambda_value=0.4, orientation="rows"))
    assert not torch.allclose(expected, q_g)
    assert_same(dpm_metrics["all"], direct_metrics(expected, q, g), len(splits.query))

    q = extract_features(
        vit, loader_for(splits, splits.query, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    g = extract_features(
        vit, loader_for(splits, splits.gallery, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    expected = rerank_features(q.features, g.features, k1=6, k2=3, lambda_value=0.4)
    assert_same(vit_metrics["all"], direct_metrics(expected, q, g), len(splits.query))
    rows = query_subsets(splits, splits.query)["occluded"]
    assert_same(vit_metrics["occluded"], direct_metrics(expected, q, g, rows), len(rows))


def test_gnn_rerank_path(splits, tmp_path):
    vit = tiny_model("vit_baseline")
    options = dict(image_size=(64, 32), batch_size=8, pictures=False, progress=False)
    metrics = evaluate_model(vit, splits, model_name="vit_baseline", rerank="gnn", k1=6, out_dir=tmp_path, **options)
    q = extract_features(
        vit, loader_for(splits, splits.query, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    g = extract_features(
        vit, loader_for(splits, splits.gallery, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    expected = gnn_rerank(q.features, g.features, k1=6, k2=7)  # k2 unset: GNN's default
    assert_same(metrics["all"], direct_metrics(expected, q, g), len(splits.query))
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert (settings["rerank"], settings["rerank_method"], settings["k1"], settings["k2"]) == (True, "gnn", 6, 7)
    # DPM's masked arccos has no GNN form: refused before any extraction
    with pytest.raises(ValueError, match="^rerank 'gnn' ranks by the cosine of the features"):
        evaluate_model(tiny_model("dpm"), splits, model_name="dpm", rerank="gnn", **options)


def test_aqe_path(splits, tmp_path):
    # alpha query expansion of the pooled features, then the model's test distance (DPM: each item keeps
    # its own mask) and, optionally, re-ranking, as fast-reid's TEST.AQE orders them
    options = dict(image_size=(64, 32), batch_size=8, pictures=False, progress=False)
    for name in ("vit_baseline", "dpm"):
        model = tiny_model(name)
        q, g = (
            extract_features(model, loader_for(splits, records, name), model_name=name, progress=False)
            for records in (splits.query, splits.gallery)
        )
        qf, gf = alpha_query_expansion(q.features, g.features, k=4, alpha=2.0)
        if name == "dpm":
            plain = masked_arccos_distance(qf, q.masks, gf)
            reranked = re_ranking(
                plain,
                masked_arccos_distance(qf, q.masks, qf),
                masked_arccos_distance(gf, g.masks, gf),
                k1=6,
                k2=3,
                input="euclidean",
                orientation="rows",
            )
        else:
            plain, reranked = pairwise_distance(qf, gf), rerank_features(qf, gf, k1=6, k2=3)
        aqe = dict(k=4, alpha=2.0)
        for rerank, expected in ((False, plain), (True, reranked)):
            metrics = evaluate_model(
                model, splits, model_name=name, aqe=aqe, rerank=rerank, k1=6, k2=3, out_dir=tmp_path, **options
            )
            assert_same(metrics["all"], direct_metrics(expected, q, g), len(splits.query))
            settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
            assert (settings["aqe"], settings["rerank"]) == (dict(aqe, times=1), rerank)
        unexpanded = evaluate_model(model, splits, model_name=name, **options)
        assert flat(unexpanded) != flat(metrics), "the expansion changed nothing"
    pooled = len(splits.query) + len(splits.gallery)
    for aqe, message in (
        (dict(k=pooled + 1), rf"aqe k must be an integer in \[1, {pooled}\] \(the query and gallery images\)"),
        (
            dict(times=0),
            r"aqe times must be an integer in \[1, 10\] \(rounds, each a k-NN of the query and gallery features\), got 0",
        ),
        ("on", r"aqe must be a bool or a dict of \('k', 'alpha', 'times'\), got 'on'"),
    ):
        with pytest.raises(ValueError, match=rf"^{message}"):  # before any extraction
            evaluate_model(model, splits, model_name="dpm", aqe=aqe, **options)


def test_roc_report(splits, tmp_path):
    # fast-reid's TPR@FPR of each query subset on the model's test distance, and "roc" in the settings
    options = dict(image_size=(64, 32), batch_size=8, pictures=False, progress=False)
    model = tiny_model("dpm")
    q, g = (
        extract_features(model, loader_for(splits, records, "dpm"), model_name="dpm", progress=False)
        for records in (splits.query, splits.gallery)
    )
    distmat = masked_arccos_distance(q.features, q.masks, g.features)
    metrics = evaluate_model(model, splits, model_name="dpm", roc=True, out_dir=tmp_path, **options)
    subsets = query_subsets(splits, splits.query)
    assert set(metrics) == {"all", "clean", "occluded"}
    for name, rows in (("all", torch.arange(len(q.pids))), *subsets.items()):
        labels = (q.pids[rows], g.pids, q.camids[rows], g.camids)
        expected = dict(zip(("1e-04", "1e-03", "1e-02"), 100.0 * tpr_at_fpr(distmat[rows], *labels)))
        assert metrics[name]["tpr_at_fpr"] == pytest.approx(expected), name
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["all"]["tpr_at_fpr"] == metrics["all"]["tpr_at_fpr"] and written["settings"]["roc"] is True
    assert "tpr_at_fpr" not in evaluate_model(model, splits, model_name="dpm", **options)["all"]
    with pytest.raises(ValueError, match=r"^roc must be True or False, got 'yes'"):  # before any extraction
        evaluate_model(model, splits, model_name="dpm", roc="yes", **options)


def test_distance_choices():
    generator = torch.Generator().manual_seed(0)
    feats = lambda n: F.normalize(torch.randn(n, 16, generator=generator), dim=1)  # noqa: E731
    q = FeatureSet(
        feats(6), torch.rand(6, 16, generator=generator), torch.arange(6), torch.zeros(6, dtype=torch.long), ["q"] * 6
    )
    g = FeatureSet(
        feats(9),
        torch.rand(9, 16, generator=generator),
        torch.arange(9) % 6,
        torch.ones(9, dtype=torch.long),
        ["g"] * 9,
    )
    euclidean = compute_distances(q, g, "euclidean")
    cosine = compute_distances(q, g, "cosine")
    assert torch.allclose(cosine, euclidean.square() / 2, atol=1e-5)  # unit vectors: same ranking
    # cosine re-ranking is the Euclidean one (the row normalisation removes the factor 2)
    assert torch.allclose(
        compute_distances(q, g, "cosine", rerank=True, k1=3, k2=2),
        compute_distances(q, g, "euclidean", rerank=True, k1=3, k2=2),
        atol=1e-5,
    )
    assert evaluator.resolve_distance("auto", "dpm") == "masked_arccos"
    assert evaluator.resolve_distance("auto", "maskreid") == "euclidean"
    with pytest.raises(ValueError, match="channel masks"):
        evaluator.resolve_distance("masked_arccos", "vit_baseline")
    with pytest.raises(ValueError, match="distance"):
        evaluator.resolve_distance("manhattan", "dpm")


def test_rerank_distances_per_metric():
    """compute_distances itself (the metrics above can hide a changed matrix): DPM's masked arccos
    re-ranked with each item's own mask (the reference reads columns); Euclidean on the features
    as given; cosine on the L2-normalised features, i.e. the Euclidean one of unit vectors."""
    generator = torch.Generator().manual_seed(1)
    scale = lambda n: 0.5 + 2 * torch.rand(n, 1, generator=generator)  # noqa: E731
    qf, gf = torch.randn(7, 16, generator=generator), torch.randn(11, 16, generator=generator)
    qm, gm = torch.rand(7, 16, generator=generator), torch.rand(11, 16, generator=generator)
    q = FeatureSet(F.normalize(qf, dim=1), qm, torch.arange(7), torch.zeros(7, dtype=torch.long), ["q"] * 7)
    g = FeatureSet(F.normalize(gf, dim=1), gm, torch.arange(11) % 7, torch.ones(11, dtype=torch.long), ["g"] * 11)
    options = dict(rerank=True, k1=4, k2=2, lambda_value=0.3)
    q_g, q_q, g_g = (
        masked_arccos_distance(q.features, qm, g.features),
        masked_arccos_distance(q.features, qm, q.features),
        masked_arccos_distance(g.features, gm, g.features),
    )
    expected = re_ranking(q_g, q_q.T, g_g.T, k1=4, k2=2, lambda_value=0.3)
    torch.testing.assert_close(compute_distances(q, g, "masked_arccos", **options), expected)
    raw_q = dataclasses.replace(q, features=q.features * scale(7))
    raw_g = dataclasses.replace(g, features=g.features * scale(11))
    torch.testing.assert_close(
        compute_distances(raw_q, raw_g, "euclidean", **options),
        rerank_features(raw_q.features, raw_g.features, k1=4, k2=2, lambda_value=0.3),
    )
    torch.testing.assert_close(
        compute_distances(raw_q, raw_g, "cosine", **options),
        rerank_features(q.features, g.features, k1=4, k2=2, lambda_value=0.3),
    )


def test_rerank_defaults_are_the_standard_k1_20_k2_6_lambda_0_3_and_masked_arccos_needs_masks():
    generator = torch.Generator().manual_seed(2)
    qf, gf = torch.randn(12, 8, generator=generator), torch.randn(40, 8, generator=generator)
    q = FeatureSet(qf, None, torch.arange(12), torch.zeros(12, dtype=torch.long), ["q"] * 12)
    g = FeatureSet(gf, None, torch.arange(40) % 12, torch.ones(40, dtype=torch.long), ["g"] * 40)
    torch.testing.assert_close(
        compute_distances(q, g, "euclidean", rerank=True), rerank_features(qf, gf, k1=20, k2=6, lambda_value=0.3)
    )
    with pytest.raises(ValueError, match="distance='masked_arccos' needs the masks of queries and gallery"):
        compute_distances(q, g, "masked_arccos")
    with_masks = dataclasses.replace(q, masks=torch.ones(12, 8))
    with pytest.raises(ValueError, match="needs the masks"):
        compute_distances(with_masks, g, "masked_arccos")


def test_gallery_smaller_than_rank10():
    """With fewer gallery items than 10, Rank-5 / Rank-10 are the CMC's last value (every query
    has found its match by then)."""
    q = FeatureSet(torch.zeros(3, 2), None, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long), ["q"] * 3)
    g = FeatureSet(torch.zeros(4, 2), None, torch.tensor([2, 1, 0, 3]), torch.ones(4, dtype=torch.long), ["g"] * 4)
    distmat = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # query i's match is at rank 3 - i
    with pytest.warns(UserWarning, match="gallery size"):
        metrics = evaluator.rank_metrics(distmat, q, g)["all"]
    assert metrics["cmc"] == pytest.approx([100 / 3, 200 / 3, 100.0, 100.0])
    assert (metrics["rank1"], metrics["rank5"], metrics["rank10"]) == pytest.approx((100 / 3, 100.0, 100.0))


def test_rank_k_is_the_cmc_at_k():
    # 10 queries, 12 gallery items: query i's only match is at rank i + 1, so the CMC climbs by 10 a rank
    q = FeatureSet(torch.zeros(10, 2), None, torch.arange(10), torch.zeros(10, dtype=torch.long), ["q"] * 10)
    g = FeatureSet(torch.zeros(12, 2), None, torch.arange(12), torch.ones(12, dtype=torch.long), ["g"] * 12)
    distmat = torch.rand(10, 12, generator=torch.Generator().manual_seed(0)) + 1.0
    for i in range(10):
        others = [j for j in range(12) if j != i][:i]
        distmat[i, others] = torch.arange(i, dtype=torch.float32) / 100  # i non-matches before the match
        distmat[i, i] = 0.5
    metrics = evaluator.rank_metrics(distmat, q, g, max_rank=12)["all"]
    assert metrics["cmc"] == pytest.approx([10.0 * r for r in range(1, 11)] + [100.0, 100.0])
    assert (metrics["rank1"], metrics["rank5"], metrics["rank10"]) == pytest.approx((10.0, 50.0, 100.0))


def test_subset_without_a_match_is_left_out_with_a_warning():
    q = FeatureSet(torch.zeros(3, 2), None, torch.tensor([0, 1, 9]), torch.zeros(3, dtype=torch.long), ["q"] * 3)
    g = FeatureSet(torch.zeros(2, 2), None, torch.tensor([1, 0]), torch.ones(2, dtype=torch.long), ["g"] * 2)
    subsets = {"clean": torch.tensor([0, 1]), "occluded": torch.tensor([2])}  # pid 9 is not in the gallery
    with pytest.warns(UserWarning, match="'occluded': no query has a match"):
        metrics = evaluator.rank_metrics(torch.rand(3, 2), q, g, subsets)
    assert set(metrics) == {"all", "clean"} and metrics["clean"]["num_valid"] == 2


def test_settings_record_rerank_and_precision(splits, tmp_path):
    evaluate_model(
        tiny_model("vit_baseline"),
        splits,
        model_name="vit_baseline",
        image_size=(64, 32),
        amp_dtype=torch.bfloat16,
        rerank=True,
        k1=6,
        k2=3,
        lambda_value=0.4,
        out_dir=str(tmp_path),
        pictures=False,
        progress=False,
    )
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert {k: settings[k] for k in ("rerank", "k1", "k2", "lambda_value", "amp", "image_size")} == {
        "rerank": True,
        "k1": 6,
        "k2": 3,
        "lambda_value": 0.4,
        "amp": "bfloat16",
        "image_size": [64, 32],
    }


def test_explicit_cosine_matches_euclidean_metrics(splits):
    model = tiny_model("vit_baseline")
    options = dict(model_name="vit_baseline", image_size=(64, 32), batch_size=16, pictures=False, progress=False)
    euclidean = evaluate_model(model, splits, distance="euclidean", **options)
    cosine = evaluate_model(model, splits, distance="cosine", **options)
    assert cosine["all"]["mAP"] == pytest.approx(euclidean["all"]["mAP"], abs=1e-6)


def test_bad_arguments(splits):
    model = tiny_model("vit_baseline")
    options = dict(image_size=(64, 32), pictures=False, progress=False)
    with pytest.raises(ValueError, match="model_name"):
        evaluate_model(model, splits, model_name="resnet", **options)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_model(model, splits, model_name="vit_baseline", max_rank=5, **options)
    with pytest.raises(ValueError, match=r"^image_size must be 2 integers >= 1 \(height, width\), got \(64,\)$"):
        evaluate_model(model, splits, model_name="vit_baseline", image_size=(64,), pictures=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(model, splits, model_name="vit_baseline", batch_size=0, **options)
    with pytest.raises(ValueError, match="with_masks"):
        evaluate_model(
            tiny_model("maskreid"),
            dataclasses.replace(splits, mask_paths=None),
            model_name="maskreid",
            pictures=False,
            progress=False,
        )
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(model, dataclasses.replace(splits, query=[]), model_name="vit_baseline", **options)
    for bad, name in (
        (dict(protocol="cuhk"), "protocol"),
        (dict(num_repeats=0), "num_repeats"),
        (dict(seed=-1), "seed"),
        (dict(multi_query="mean"), "multi_query"),
        (dict(multi_query="avg"), "gt_bbox"),
    ):  # the synthetic set has no pools
        with pytest.raises(ValueError, match=name):
            evaluate_model(model, splits, model_name="vit_baseline", **bad, **options)


def test_bad_options_fail_before_any_extraction(splits, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("features extracted before the options were checked")

    monkeypatch.setattr(evaluator, "_extract_split", no_extraction)
    options = dict(model_name="vit_baseline", image_size=(64, 32), pictures=False, progress=False)
    for bad, needle in (
        (dict(image_size=(64, 0)), "image_size"),
        (dict(batch_size=0), r"^batch_size must be an integer >= 1, got 0$"),
        (dict(seed=-1), "seed"),
        (dict(num_repeats=0), "num_repeats"),
        (dict(max_rank=9), r"^max_rank must be an integer >= 10 \(Rank-10 is reported\), got 9$"),
        (dict(max_rank=10.0), "max_rank must be an integer"),
        (dict(multi_query="mean"), r"^multi_query must be one of \('off', 'avg', 'max'\), got 'mean'$"),
        (dict(splits=dataclasses.replace(splits, gallery=[])), r"^splits '\w+' has an empty query or gallery list$"),
        # checked only after the extraction before (minutes on a real dataset), or a traceback then
        (dict(rerank=True, k1=0), r"^k1 must be an integer >= 1"),
        (dict(rerank=True, lambda_value=-1.0), r"^lambda_value must be a number in \[0, 1\], got -1.0$"),
        (dict(rerank="no"), r"^rerank must be a bool or one of \('kreciprocal', 'gnn'\), got 'no'$"),
        (
            dict(model_name="dpm"),
            r"^model_name 'dpm' does not match the model, a ViTBaseline \(model_name 'vit_baseline'\)$",
        ),
        (
            dict(model=torch.nn.Linear(2, 2)),
            r"^model_name 'vit_baseline' does not match the model, a Linear \(not a ViTB",
        ),
        (dict(model="model.pt"), r"^model must be a torch.nn.Module, got str$"),
        (dict(splits=[1, 2]), r"^splits must be the ReIDSplits of a dataset \(build_dataset\), got list$"),
        (dict(device="gpu"), r"^device must be a torch.device or a name such as cpu, cuda, cuda:N, got 'gpu'$"),
        (dict(out_dir=__file__), r"^out_dir .* exists and is not a folder$"),
    ):
        with pytest.raises(ValueError, match=needle):
            evaluate_model(**{"model": tiny_model("vit_baseline"), "splits": splits, **options, **bad})
    # the smallest accepted values reach the extraction
    with pytest.raises(AssertionError, match="features extracted"):
        evaluate_model(tiny_model("vit_baseline"), splits, **options, max_rank=10, batch_size=1)
    # a compiled model is its module's model (the check looks through torch.compile's wrapper)
    with pytest.raises(AssertionError, match="features extracted"):
        evaluate_model(torch.compile(tiny_model("vit_baseline")), splits, **options)


def test_concat_skips_empty_shards():
    """A rank with no records returns a FeatureSet without a feature width (torch.zeros(0, 0))."""
    empty = FeatureSet(torch.zeros(0, 0), None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), [])
    full = FeatureSet(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([4, 5]), torch.tensor([0, 1]), ["a", "b"])
    joined = FeatureSet.concat([empty, full, empty, full])
    assert joined.features.shape == (4, 3) and joined.masks.shape == (4, 3)
    assert joined.pids.tolist() == [4, 5, 4, 5] and joined.paths == ["a", "b", "a", "b"]
    assert len(FeatureSet.concat([empty, empty])) == 0


@pytest.mark.parametrize("count", [0, 1, 5, 7, 12])
def test_shards_cover_the_records_once_in_order(count):
    records = list(range(count))
    for world in (1, 2, 3, 5):
        shards = [extraction._shard(records, rank, world) for rank in range(world)]
        assert [r for shard in shards for r in shard] == records
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # even shards


def test_pooling_needs_masks_on_both_sides():
    with_masks = FeatureSet(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([1]), torch.tensor([0]), ["q/1.jpg"])
    without = dataclasses.replace(with_masks, masks=None, paths=["p/1.jpg"])
    for query, pool in ((with_masks, without), (without, with_masks)):
        with pytest.raises(ValueError, match="both have DPM masks"):
            pool_multi_query(query, pool, "avg")


def test_pooling_refuses_what_it_cannot_pool():
    query = FeatureSet(
        torch.randn(1, 4), None, torch.tensor([5]), torch.tensor([0]), ["/query/0005_c1s1_000001_00.jpg"]
    )
    # the query's file in the pool under another pid: its group had no member and it pooled to zeros
    pool = FeatureSet(
        torch.randn(2, 4),
        None,
        torch.tensor([7, 7]),
        torch.tensor([0, 0]),
        ["/gt/0005_c1s1_000001_00.jpg", "/gt/b.jpg"],
    )
    for mode in ("avg", "max"):
        with pytest.raises(ValueError, match=r"^1 queries \(e.g. /query/0005_c1s1_000001_00.jpg\) have no pool image"):
            pool_multi_query(query, pool, mode)
    with pytest.raises(ValueError, match="^query and pool features differ in width: 4 and 3$"):
        pool_multi_query(query, dataclasses.replace(pool, features=torch.randn(2, 3)), "avg")
    with pytest.raises(ValueError, match="^query and pool must be FeatureSets, got FeatureSet, list$"):
        pool_multi_query(query, [], "avg")


def test_cuhk03_protocol(splits, tmp_path):
    model = tiny_model("vit_baseline")
    metrics = evaluate_model(
        model,
        splits,
        model_name="vit_baseline",
        image_size=(64, 32),
        protocol="cuhk03",
        num_repeats=4,
        seed=3,
        out_dir=str(tmp_path),
        pictures=False,
        progress=False,
    )
    q = extract_features(
        model, loader_for(splits, splits.query, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    g = extract_features(
        model, loader_for(splits, splits.gallery, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    distmat = pairwise_distance(q.features, g.features, "euclidean")
    expected = evaluate_rank(distmat, q.pids, g.pids, q.camids, g.camids, protocol="cuhk03", num_repeats=4, seed=3)
    assert_same(metrics["all"], expected, len(splits.query))
    assert metrics["all"]["cmc"] != pytest.approx(list(100 * direct_metrics(distmat, q, g).cmc))
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert (settings["protocol"], settings["num_repeats"], settings["seed"], settings["amp"]) == ("cuhk03", 4, 3, "off")


def with_pools(splits):
    """The synthetic splits with multi-query pools: for every query, its own image (same file
    name, as in Market-1501's gt_bbox) for half of them, plus two gallery images relabelled to the
    query's pid and camera, and an image of another (pid, camera) that no query has."""
    pools = []
    for index, record in enumerate(splits.query):
        if index % 2:
            pools.append(record)
        for other in (index, 3 * index + 1):
            pools.append(splits.gallery[other % len(splits.gallery)]._replace(pid=record.pid, camid=record.camid))
    pools.append(splits.gallery[0]._replace(pid=10_000, camid=0))
    return dataclasses.replace(splits, multi_query=pools)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_multi_query(splits, mode):
    pooled_splits = with_pools(splits)
    model = tiny_model("dpm")
    q = extract_features(model, loader_for(splits, splits.query, "dpm"), model_name="dpm", progress=False)
    pool = extract_features(
        model, loader_for(splits, pooled_splits.multi_query, "dpm"), model_name="dpm", progress=False
    )
    result = pool_multi_query(q, pool, mode)
    assert result.paths == q.paths and torch.equal(result.pids, q.pids) and torch.equal(result.camids, q.camids)
    reduce = (lambda x: x.mean(0)) if mode == "avg" else (lambda x: x.amax(0))
    for row, path in enumerate(q.paths):
        key = (int(q.pids[row]), int(q.camids[row]))
        members = [i for i, r in enumerate(pooled_splits.multi_query) if (r.pid, r.camid) == key]
        features, masks = pool.features[members], pool.masks[members]
        if path not in {r.path for r in pooled_splits.multi_query}:  # the query counts once, as its own box
            features, masks = (
                torch.cat([features, q.features[row : row + 1]]),
                torch.cat([masks, q.masks[row : row + 1]]),
            )
        torch.testing.assert_close(result.features[row], F.normalize(reduce(features), dim=0))
        torch.testing.assert_close(result.masks[row], reduce(masks))
    with pytest.raises(ValueError, match="mode"):
        pool_multi_query(q, pool, "off")


def test_multi_query_in_evaluate_model(splits, tmp_path):
    pooled_splits = with_pools(splits)
    model = tiny_model("vit_baseline")
    options = dict(model_name="vit_baseline", image_size=(64, 32), pictures=False, progress=False)
    metrics = evaluate_model(model, pooled_splits, multi_query="max", out_dir=str(tmp_path), **options)
    q = extract_features(
        model, loader_for(splits, splits.query, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    g = extract_features(
        model, loader_for(splits, splits.gallery, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    pool = extract_features(
        model, loader_for(splits, pooled_splits.multi_query, "vit_baseline"), model_name="vit_baseline", progress=False
    )
    pooled = pool_multi_query(q, pool, "max")
    distmat = pairwise_distance(pooled.features, g.features, "euclidean")
    assert_same(metrics["all"], direct_metrics(distmat, pooled, g), len(splits.query))
    single = evaluate_model(model, pooled_splits, **options)
    assert metrics["all"]["mAP"] != pytest.approx(single["all"]["mAP"])
    assert json.loads((tmp_path / "metrics.json").read_text())["settings"]["multi_query"] == "max"


def test_test_camids_pick_the_sie_embedding(splits):
    # DPM on Occluded-REID: the gallery camera selects the SIE embedding, so it changes every gallery feature.
    model = tiny_model("dpm")
    camera = lambda camid: [r._replace(camid=camid) for r in splits.gallery[:4]]  # noqa: E731
    one, two = (
        extract_features(model, loader_for(splits, camera(c), "dpm"), model_name="dpm", progress=False) for c in (1, 2)
    )
    assert not torch.allclose(one.features, two.features)
    with pytest.raises(ValueError, match=r"camera id 3 .* 3 camera embeddings \(SIE\).*0\.\.2"):
        extract_features(model, loader_for(splits, camera(3), "dpm"), model_name="dpm", progress=False)


def evaluate_baseline(splits):
    """evaluate_model of a tiny random ViT baseline at 64x32, without pictures or progress bars."""
    return evaluate_model(
        tiny_model("vit_baseline"),
        splits,
        model_name="vit_baseline",
        image_size=(64, 32),
        pictures=False,
        progress=False,
    )


def test_unlabelled_dataset_reports_all_only(splits):
    unlabelled = dataclasses.replace(splits, occluded_paths=None)
    metrics = evaluate_baseline(unlabelled)
    assert set(metrics) == {"all"}
    table = format_metrics_table(metrics)
    assert table.splitlines()[0].split() == ["queries", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "#queries"]
    assert len(table.splitlines()) == 3 and table.splitlines()[2].split()[0] == "all"


def test_models_without_masks_never_read_them(splits):
    # Only MaskReID's loader pairs images with masks; a ViT evaluation must not need the files.
    absent = {r.path: "/nonexistent/mask.png" for r in (*splits.query, *splits.gallery)}
    metrics = evaluate_baseline(dataclasses.replace(splits, mask_paths=absent))
    assert metrics["all"] == evaluate_baseline(splits)["all"]


def test_subset_without_queries_is_left_out(splits):
    all_occluded = dataclasses.replace(splits, occluded_paths=frozenset(r.path for r in splits.query))
    metrics = evaluate_baseline(all_occluded)
    assert set(metrics) == {"all", "occluded"}  # Occluded-REID style: every query occluded
    assert flat({"x": metrics["occluded"]}) == pytest.approx(flat({"x": metrics["all"]}))


def test_bfloat16_autocast_gives_float32_features(splits):
    model = tiny_model("dpm")
    loader = loader_for(splits, splits.query[:5], "dpm")
    full = extract_features(model, loader, model_name="dpm", progress=False)
    half = extract_features(model, loader, model_name="dpm", amp_dtype=torch.bfloat16, progress=False)
    assert half.features.dtype == torch.float32 and half.masks.dtype == torch.float32
    assert torch.allclose(half.features, full.features, atol=0.1)
    assert not torch.equal(half.features, full.features)  # autocast did run


def test_evaluation_precision_is_eval_amp_not_solver_amp(splits, monkeypatch):
    from dpm_ops.engine.config import load_config
    from dpm_ops.engine.builders import evaluate_with_config

    seen = {}
    monkeypatch.setattr(evaluator, "evaluate_model", lambda model, splits, **options: seen.update(options))
    for overrides, expected in (
        (["solver.amp=bf16"], None),
        (["solver.amp=off", "eval.amp=bf16"], torch.bfloat16),
        (["eval.amp=fp16"], torch.float16),
        (["eval.amp=auto"], None),
    ):  # auto: off on CPU
        evaluate_with_config(tiny_model("dpm"), splits, load_config(None, overrides), device=torch.device("cpu"))
        assert seen["amp_dtype"] is expected, overrides
        assert seen["flip"] is False and seen["roc"] is False
    config = load_config(None, ["eval.flip=true", "eval.roc=true"])
    evaluate_with_config(tiny_model("dpm"), splits, config, device=torch.device("cpu"))
    assert seen["flip"] is True and seen["roc"] is True
    config = load_config(
        None, ["eval.pictures=true", "eval.protocol=cuhk03", "eval.cuhk03_repeats=3", "eval.cuhk03_seed=7"]
    )
    for pictures, expected in ((None, True), (False, False)):  # the argument overrides eval.pictures
        evaluate_with_config(tiny_model("dpm"), splits, config, device=torch.device("cpu"), pictures=pictures)
        assert (seen["pictures"], seen["num_repeats"], seen["seed"]) == (expected, 3, 7)


def test_format_metrics_table():
    row = {
        "rank1": 50.0,
        "rank5": 75.25,
        "rank10": 90.0,
        "mAP": 41.26,
        "mINP": 12.0,
        "num_query": 12,
        "num_valid": 12,
        "cmc": [50.0],
    }
    clean = {**row, "num_query": 4, "num_valid": 4}
    table = format_metrics_table({"all": row, "clean": clean, "settings": {"distance": "x"}})
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["all", "clean"]
    assert lines[2].split()[1:] == ["50.0", "75.2", "90.0", "41.3", "12.0", "12"]
    # queries without a match are left out of the scores: counted as scored, and said (they were counted silently)
    lines = format_metrics_table({"all": {**row, "num_valid": 9}, "clean": clean}).splitlines()
    assert lines[2].split()[-1] == "9" and lines[-1] == "(3 of 12 all queries have no match in the gallery: left out)"
    # a row per test set (evaluate_with_config's summary of several): each set's left-out queries said, names wider
    sets = {"occluded_duke": {**row, "num_valid": 9}, "market1501": clean, "dgd_viper": {**row, "num_valid": 11}}
    lines = format_metrics_table(sets, label="test set").splitlines()
    assert lines[0].split()[:3] == ["test", "set", "Rank-1"] and lines[2].split()[:2] == ["occluded_duke", "50.0"]
    assert len({len(line) for line in lines[:5]}) == 1  # the columns aligned past the longest name
    assert lines[5:] == [
        "(3 of 12 occluded_duke queries have no match in the gallery: left out)",
        "(1 of 12 dgd_viper queries have no match in the gallery: left out)",
    ]
    with pytest.raises(ValueError, match="no subset"):
        format_metrics_table({"settings": {}})
    with pytest.raises(ValueError, match="malformed"):
        format_metrics_table({"all": {"mAP": 1.0}})
    with pytest.raises(ValueError, match="dict"):
        format_metrics_table([row])


def test_metrics_json_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    evaluator.write_json_atomic(str(path), {"all": {"mAP": 1.0}})
    assert json.loads(path.read_text()) == {"all": {"mAP": 1.0}}

    def failing_dump(payload, handle, **kwargs):
        handle.write('{"all": ')  # a crash half-way through the write
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluator.json, "dump", failing_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluator.write_json_atomic(str(path), {"all": {"mAP": 2.0}})
    assert json.loads(path.read_text()) == {"all": {"mAP": 1.0}}  # the old file, whole
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary left behind


def evaluate_with_pictures(splits, model_name, out_dir):
    evaluate_model(
        tiny_model(model_name),
        splits,
        model_name=model_name,
        image_size=(64, 32),
        batch_size=16,
        out_dir=str(out_dir),
        progress=False,
    )


def test_pictures_are_written(splits, tmp_path, monkeypatch):
    figures = record_figures(monkeypatch)
    evaluate_with_pictures(splits, "dpm", tmp_path)
    for name in ("metrics.json", "cmc.png", "ranked_best.png", "ranked_worst.png", "masks.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    picture = {name: figures[str(tmp_path / f"{name}.png")] for name in ("cmc", "ranked_best", "ranked_worst", "masks")}
    assert picture["cmc"].axes[0].get_title() == "CMC: dpm on synthetic"
    occluded = [splits.is_occluded(record) for record in splits.query]  # 6 of the 14 queries
    for which, order in (("best", -1), ("worst", 1)):
        fig = picture[f"ranked_{which}"]
        # 8 queries (rows of 64 x 128 thumbnails), each with its 10 nearest gallery images
        assert tuple(fig.get_size_inches() * fig.dpi) == (11 * 76 + 16, 8 * 165)
        labels = [re.fullmatch(r"query (\d+): .*, AP ([\d.]+)%, (\w+)", t.get_text()) for t in fig.axes[0].texts]
        labels = [(int(m[1]), float(m[2]), m[3]) for m in labels if m]
        assert len(labels) == 8 and all(tag == ("occluded" if occluded[q] else "clean") for q, _, tag in labels)
        aps = [ap for _, ap, _ in labels]
        assert aps == sorted(aps, key=lambda ap: order * ap) and aps[0] != aps[-1]
    # masks: 8 example queries, half occluded; the profile over all 14 queries, clean and occluded apart
    masks = picture["masks"]
    titles = [ax.get_title().split("\n")[1] for ax in masks.axes[:32:4]]
    assert titles == ["occluded"] * 4 + ["clean"] * 4
    assert "over 14 queries" in masks.get_suptitle()
    legend = [text.get_text() for text in masks.axes[-1].get_legend().get_texts()]
    assert [entry.split(", mean")[0] for entry in legend] == ["clean queries (n=8", "occluded queries (n=6"]


def test_pictures_of_a_model_without_channel_masks(splits, tmp_path):
    # the ViT baseline has no channel masks to picture: the CMC and the ranked lists, no masks.png
    (tmp_path / "masks.png").write_bytes(b"an earlier DPM evaluation's")  # not this evaluation's: removed
    evaluate_with_pictures(splits, "vit_baseline", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["cmc.png", "metrics.json", "ranked_best.png", "ranked_worst.png"]
    # without pictures, the earlier ones sat beside the new metrics.json as if they were its
    evaluate_model(
        tiny_model("vit_baseline"),
        splits,
        model_name="vit_baseline",
        image_size=(64, 32),
        out_dir=str(tmp_path),
        pictures=False,
        progress=False,
    )
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_picture_that_fails_to_write_leaves_no_earlier_one_beside_the_new_metrics(splits, tmp_path, monkeypatch):
    """A full disk while the ranked lists were drawn kept the earlier evaluation's ranked_*.png beside the new
    metrics.json, as if they were its."""
    from dpm_ops import visualize

    evaluate_with_pictures(splits, "vit_baseline", tmp_path)

    def full_disk(*args, out_png, **kwargs):
        raise OSError(28, "No space left on device", out_png)

    monkeypatch.setattr(visualize, "plot_ranked_lists", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        evaluate_with_pictures(splits, "vit_baseline", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["cmc.png", "metrics.json"]  # the new evaluation's, nothing earlier


def test_mask_examples_are_spread_half_occluded():
    assert _mask_examples(None, 10, 4).tolist() == [0, 3, 6, 9]
    assert _mask_examples(None, 3, 8).tolist() == [0, 1, 2]
    occluded = np.array([True, False, False, True, False, True, False, False, False, False])
    # the odd one goes to the occluded queries: 2 of 3 occluded, 1 of 7 clean
    assert _mask_examples(occluded, 10, 3).tolist() == [0, 5, 1]
    assert _mask_examples(occluded, 10, 4).tolist() == [0, 5, 1, 9]
    assert _mask_examples(np.zeros(5, dtype=bool), 5, 4).tolist() == [0, 4]  # no occluded query: the clean half


def test_dpm_token_maps_are_neutral_for_a_flat_mask(splits):
    model = tiny_model("dpm")
    paths = [r.path for r in splits.query[:3]]
    camids = torch.tensor([r.camid for r in splits.query[:3]])
    transform = evaluator.eval_transform("dpm", (64, 32))
    flat = evaluator.dpm_token_maps(model, paths, camids, torch.full((3, 32), 0.3), transform)
    assert flat.shape == (3, 8, 4) and np.allclose(flat, 1.0, atol=1e-5)
    mask = torch.zeros(3, 32)
    mask[:, :16] = 1.0
    half = evaluator.dpm_token_maps(model, paths, camids, mask, transform)
    assert not np.allclose(half, 1.0) and (half >= 0).all() and (half <= 2.0 + 1e-5).all()


def test_dpm_token_maps_follow_the_formula(splits):
    # sum_c m_c^2 t_c^2 / (sum_c t_c^2 * mean_c m_c^2) over the final LayerNorm's patch tokens t
    model = tiny_model("dpm").train()
    normed = []
    model.backbone.norm.register_forward_hook(lambda module, args, out: normed.append(out))
    paths = [r.path for r in splits.query[:2]]
    camids = torch.tensor([r.camid for r in splits.query[:2]])
    mask = torch.rand(2, 32, generator=torch.Generator().manual_seed(0))
    maps = evaluator.dpm_token_maps(model, paths, camids, mask, evaluator.eval_transform("dpm", (64, 32)))
    assert model.training  # put back as it was
    energy = normed[0][:, 1:].square()  # the first call normalises every token of the last block; CLS first
    m2 = mask.square()[:, None, :]
    expected = (energy * m2).sum(-1) / energy.sum(-1) / m2.mean(-1)
    np.testing.assert_allclose(maps, expected.reshape(2, 8, 4).numpy(), rtol=1e-5)


# ------------------------------------------------------------------------------------ DDP


def ranked_model():
    """tiny_model("dpm") without its camera embedding: the random SIE puts every cross-camera (valid) match
    last, where a changed ranking leaves the metrics as they are."""
    model = tiny_model("dpm")
    torch.nn.init.zeros_(model.backbone.sie_embed)
    return model


# multi-query pooling and re-ranking: the pool is sharded too, re-ranking runs on the gathered features
POOLED_RERANKED = dict(
    model_name="dpm", image_size=(64, 32), batch_size=4, multi_query="max", rerank=True, k1=6, k2=3, progress=False
)


def _ddp_worker(rank, world, init_file, root, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # the DDP model dies with this call: held past destroy_process_group, it kept gloo's threads alive, and one
        # freeing a tensor at interpreter shutdown aborted the rank (SIGABRT, seen under the GPU machine's torch)
        _ddp_evaluations(rank, root, out_dir)
    finally:
        dist.destroy_process_group()
    # Still, under the GPU machine's torch, gloo's threads now and then abort a rank at interpreter shutdown
    # ("terminate called without an active exception", SIGABRT) after its work is saved: leave without it.
    os._exit(0)


def _ddp_evaluations(rank, root, out_dir):
    splits = build_dataset("synthetic", root, with_masks=True)
    splits = dataclasses.replace(splits, query=splits.query[:-1])  # odd counts: uneven shards
    model = torch.nn.parallel.DistributedDataParallel(tiny_model("dpm"))
    metrics = evaluate_model(
        model,
        splits,
        model_name="dpm",
        image_size=(64, 32),
        batch_size=4,
        out_dir=out_dir if rank == 0 else None,
        pictures=False,
        progress=False,
    )
    transform = evaluator.eval_transform("dpm", (64, 32))
    gathered = evaluator._extract_split(
        model,
        splits.gallery,
        splits,
        "dpm",
        transform,
        batch_size=4,
        num_workers=0,
        device="cpu",
        amp_dtype=None,
        flip=False,
        progress=False,
        desc="g",
    )
    pooled = evaluate_model(ranked_model(), with_pools(splits), **POOLED_RERANKED)
    torch.save({"metrics": metrics, "gallery": gathered, "pooled": pooled}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_gather_equals_single_process(dataset_root, splits, tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), dataset_root, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank1["metrics"] is None and rank1["gallery"] is None

    single_splits = dataclasses.replace(splits, query=splits.query[:-1])
    model = tiny_model("dpm")
    single = evaluate_model(
        model, single_splits, model_name="dpm", image_size=(64, 32), batch_size=7, pictures=False, progress=False
    )
    assert flat(rank0["metrics"]) == pytest.approx(flat(single), abs=1e-6)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert flat({"all": saved["all"]}) == pytest.approx(flat({"all": single["all"]}), abs=1e-6)
    gallery = extract_features(model, loader_for(splits, splits.gallery, "dpm"), model_name="dpm", progress=False)
    assert rank0["gallery"].paths == gallery.paths  # gathered back in dataset order
    assert torch.allclose(rank0["gallery"].features, gallery.features, atol=1e-5)
    assert torch.allclose(rank0["gallery"].masks, gallery.masks, atol=1e-5)
    assert torch.equal(rank0["gallery"].pids, gallery.pids)
    pooled = evaluate_model(ranked_model(), with_pools(single_splits), **POOLED_RERANKED)
    assert rank1["pooled"] is None and flat(rank0["pooled"]) == pytest.approx(flat(pooled), abs=1e-6)
    plain = evaluate_model(ranked_model(), single_splits, **{**POOLED_RERANKED, "multi_query": "off", "rerank": False})
    assert pooled["all"]["mAP"] != pytest.approx(plain["all"]["mAP"])  # both options change the ranking
