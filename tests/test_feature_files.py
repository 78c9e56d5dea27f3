"""The feature files of `dpm-reid extract` read back and ranked (`dpm-reid rank`, dpm_ops.feature_files):
the evaluator's numbers from the same images, Market's junk left out, bad files and options named."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpm_ops.cli import main
from dpm_ops.engine import load_config
from dpm_ops.engine.splits import load_splits
from dpm_ops.engine.evaluator import evaluate_model
from dpm_ops.engine.scoring import rank_metrics
from dpm_ops.evaluation import alpha_query_expansion, evaluate_rank, gnn_rerank, pairwise_distance, rerank_features
from dpm_ops.export import ExportError
from dpm_ops.feature_files import extract_folder, save_features_npz
from dpm_ops.feature_files import load_features_npz, rank_features
from test_cli import assert_one_line_error, tiny_set  # noqa: F401  (tiny_set: a fixture)
from test_export import MASKREID_SIZE, VIT_SIZE, checkpointed


DPM = dict(model="dpm", distance="masked_arccos")


def write_npz(path, count=12, dim=8, *, seed=0, model="vit_baseline", distance="euclidean", pids=None, **arrays):
    """A feature file as extract writes it, of random unit features: 4 identities over 2 cameras."""
    generator = np.random.default_rng(seed)
    features = generator.standard_normal((count, dim)).astype(np.float32)
    contents = dict(
        paths=np.array([f"{i:04d}.jpg" for i in range(count)]),
        features=features / np.linalg.norm(features, axis=1, keepdims=True),
        pids=np.arange(count, dtype=np.int64) % 4 if pids is None else np.asarray(pids, dtype=np.int64),
        camids=(np.arange(count, dtype=np.int64) // 4) % 2,
        model=np.array(model),
        distance=np.array(distance),
    )
    contents.update(arrays)
    np.savez(path, **contents)
    return path


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_set):  # noqa: F811  (the fixture imported above)
    """{model name: (query.npz, gallery.npz, the evaluator's metrics, its re-ranked metrics, its metrics after
    alpha query expansion (AQE))}."""
    found = {}
    for name in ("dpm", "vit_baseline", "maskreid"):
        folder = tmp_path_factory.mktemp(name)
        config_path, _, model = checkpointed(folder, tiny_set, name)
        size = MASKREID_SIZE if name == "maskreid" else VIT_SIZE
        files = []
        for split, images in (("query", "query"), ("gallery", "bounding_box_test")):
            features = extract_folder(model, tiny_set / images, image_size=size, progress=False)
            files.append(save_features_npz(folder / f"{split}.npz", features, model))
        splits = load_splits(load_config(str(config_path), []))
        options = dict(model_name=name, image_size=size, progress=False, pictures=False)
        found[name] = (
            *files,
            evaluate_model(model, splits, **options),
            evaluate_model(model, splits, rerank=True, k1=6, k2=3, lambda_value=0.4, **options),
            evaluate_model(model, splits, aqe=AQE, **options),
        )
    return found


AQE = dict(k=3, alpha=2.0)


@pytest.mark.parametrize("name", ["dpm", "vit_baseline", "maskreid"])
def test_rank_scores_extracted_files_as_the_evaluator_scores_the_dataset(extracted, name):
    query_file, gallery_file, expected, expected_reranked, expected_expanded = extracted[name]
    query, gallery = load_features_npz(query_file), load_features_npz(gallery_file)
    assert query.model == name and query.distance == ("masked_arccos" if name == "dpm" else "euclidean")
    assert (query.features.masks is not None) == (name == "dpm")
    for metrics, want in (
        (rank_features(query, gallery), expected),
        (rank_features(query, gallery, rerank=True, k1=6, k2=3, lambda_value=0.4), expected_reranked),
        (rank_features(query, gallery, aqe=AQE), expected_expanded),
    ):
        got = metrics["all"]
        for key in ("rank1", "mAP", "mINP", "num_query", "num_valid"):
            assert got[key] == pytest.approx(want["all"][key], abs=1e-4), key
        assert got["cmc"][:10] == pytest.approx(want["all"]["cmc"][:10], abs=1e-4)
    assert metrics["settings"]["aqe"] == dict(AQE, times=1)


def test_rank_command_prints_the_table_and_writes_the_metrics(extracted, tmp_path, capsys):
    query_file, gallery_file, expected, *_ = extracted["dpm"]
    out = tmp_path / "deeper" / "metrics.json"
    assert main(["rank", "--query", str(query_file), "--gallery", str(gallery_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dpm, masked_arccos distance" in printed and "Rank-1" in printed and f"metrics written to {out}" in printed
    written = json.loads(out.read_text())
    assert written["all"]["mAP"] == pytest.approx(expected["all"]["mAP"], abs=1e-4)
    assert written["settings"] == dict(
        model="dpm",
        distance="masked_arccos",
        rerank=False,
        aqe=False,
        roc=False,
        num_gallery=written["settings"]["num_gallery"],
        gallery_without_identity=0,
    )
    argv = ["rank", "--query", str(query_file), "--gallery", str(gallery_file), "--rerank", "--k1", "6", "--k2", "3"]
    assert main([*argv, "--lambda-value", "0.4", "--distance", "cosine", "--device", "cpu"]) == 0
    assert "dpm, cosine distance, re-ranked (kreciprocal)" in capsys.readouterr().out
    gnn_out = tmp_path / "gnn.json"
    argv = ["rank", "--query", str(query_file), "--gallery", str(gallery_file), "--distance", "cosine"]
    assert main([*argv, "--rerank", "gnn", "--out", str(gnn_out)]) == 0
    assert "dpm, cosine distance, re-ranked (gnn)" in capsys.readouterr().out
    query, gallery = load_features_npz(query_file), load_features_npz(gallery_file)
    expected = rank_metrics(
        gnn_rerank(query.features.features, gallery.features.features), query.features, gallery.features
    )
    written = json.loads(gnn_out.read_text())
    assert written["all"]["mAP"] == pytest.approx(expected["all"]["mAP"], abs=1e-4)
    assert {k: written["settings"][k] for k in ("rerank_method", "k1", "k2")} == dict(rerank_method="gnn", k1=26, k2=7)
    code = main(
        ["rank", "--query", str(query_file), "--gallery", str(gallery_file), "--rerank", "gnn"]
    )  # masked arccos
    assert_one_line_error(capsys, code, "rerank 'gnn' ranks by the cosine of the features and has no form for DPM's")


def test_rank_command_reports_tpr_at_fpr_with_roc(extracted, tmp_path, capsys):
    query_file, gallery_file, *_ = extracted["vit_baseline"]
    out = tmp_path / "roc.json"
    assert main(["rank", "--query", str(query_file), "--gallery", str(gallery_file), "--roc", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-3:] == ["TPR@1e-04", "TPR@1e-03", "TPR@1e-02"]
    query, gallery = load_features_npz(query_file), load_features_npz(gallery_file)
    distmat = pairwise_distance(query.features.features, gallery.features.features)
    expected = rank_metrics(distmat, query.features, gallery.features, roc=True)
    written = json.loads(out.read_text())
    assert written["all"]["tpr_at_fpr"] == pytest.approx(expected["all"]["tpr_at_fpr"])
    assert written["settings"]["roc"] is True


def test_rank_command_expands_the_queries_first_with_aqe(extracted, tmp_path, capsys):
    query_file, gallery_file, *_ = extracted["vit_baseline"]
    out = tmp_path / "aqe.json"
    argv = ["rank", "--query", str(query_file), "--gallery", str(gallery_file), "--aqe", "--aqe-k", "4"]
    assert main([*argv, "--aqe-alpha", "1.5", "--rerank", "--out", str(out)]) == 0
    assert "vit_baseline, euclidean distance, alpha query expansion, re-ranked (kreciprocal)" in capsys.readouterr().out
    query, gallery = load_features_npz(query_file), load_features_npz(gallery_file)
    qf, gf = alpha_query_expansion(query.features.features, gallery.features.features, k=4, alpha=1.5)
    expected = rank_metrics(rerank_features(qf, gf), query.features, gallery.features)
    written = json.loads(out.read_text())
    assert written["all"]["mAP"] == pytest.approx(expected["all"]["mAP"], abs=1e-4)
    assert written["settings"]["aqe"] == dict(k=4, alpha=1.5, times=1) and written["settings"]["rerank"]
    argv = ["rank", "--query", str(query_file), "--gallery", str(gallery_file), "--aqe"]
    assert main([*argv, "--out", str(out)]) == 0  # fast-reid's TEST.AQE defaults
    assert json.loads(out.read_text())["settings"]["aqe"] == dict(k=5, alpha=3.0, times=1)
    for extra, needle in (
        (["--aqe-k", "3", "--aqe-times", "2"], "--aqe-k / --aqe-times are only used with --aqe"),
        (["--k1", "6"], "--k1 is only used with --rerank"),
        (["--lambda-value", "0.2"], "--lambda-value is only used with --rerank"),
        (
            ["--aqe", "--aqe-times", "0"],
            "aqe times must be an integer in [1, 10] (rounds, each a k-NN of the query and gallery features), got 0",
        ),
        (["--aqe", "--aqe-k", "100"], "aqe k must be an integer in [1, "),
    ):
        code = main(["rank", "--query", str(query_file), "--gallery", str(gallery_file), *extra])
        assert_one_line_error(capsys, code, needle)


def test_gallery_items_without_identity_are_left_out(tmp_path):
    query = load_features_npz(write_npz(tmp_path / "q.npz", 6, seed=1))
    plain = load_features_npz(write_npz(tmp_path / "g.npz", 16, seed=2))
    junk_pids = np.r_[np.arange(16) % 4, [-1] * 5]  # Market's junk (and names not Market-style): pid -1
    with_junk = load_features_npz(write_npz(tmp_path / "j.npz", 21, seed=2, pids=junk_pids))
    assert torch.equal(with_junk.features.features[:16], plain.features.features)  # the same 16 first rows
    expected, got = rank_features(query, plain), rank_features(query, with_junk)
    assert got["all"] == expected["all"]
    assert (got["settings"]["num_gallery"], got["settings"]["gallery_without_identity"]) == (16, 5)
    # independently: the Euclidean distances of the identified rows, Market's protocol
    direct = evaluate_rank(
        pairwise_distance(query.features.features, plain.features.features, metric="euclidean"),
        query.features.pids,
        plain.features.pids,
        query.features.camids,
        plain.features.camids,
        max_rank=16,
    )
    assert got["all"]["mAP"] == pytest.approx(100 * direct.mAP, abs=1e-5)


def test_bad_files_and_options_are_named(tmp_path):
    good = write_npz(tmp_path / "good.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    partial = tmp_path / "partial.npz"
    np.savez(partial, features=np.zeros((2, 3), np.float32))
    (tmp_path / "folder.npz").mkdir()
    array_file = tmp_path / "array.npy"
    np.save(array_file, np.zeros((2, 3), np.float32))
    corrupt = tmp_path / "corrupt.npz"  # a compressed member whose deflate stream is damaged (zlib.error)
    np.savez_compressed(corrupt, features=np.arange(4096, dtype=np.float32))
    data = bytearray(corrupt.read_bytes())
    data[200:260] = b"\xff" * 60
    corrupt.write_bytes(bytes(data))
    for path, needle in (
        (tmp_path / "missing.npz", "missing.npz: not found"),
        (tmp_path / "folder.npz", "folder.npz: is a folder"),
        (garbage, "garbage.npz: not an .npz file (neither a zip archive nor a .npy array)"),
        (partial, "partial.npz: no paths, pids, camids, model, distance array: not a feature file of dpm-reid extract"),
        (write_npz(tmp_path / "m.npz", model="osnet"), "m.npz: model 'osnet' is not one of dpm, "),
        (
            write_npz(tmp_path / "i.npz", features=np.zeros((12, 8), np.int64)),
            "features must be a non-empty (N, D) float",
        ),
        (
            write_npz(tmp_path / "p.npz", pids=np.arange(11)),
            "pids must be 12 integers, one per feature, got int64 (11,)",
        ),
        (  # the dtype named: "got (12,)" read as a wrong length
            write_npz(tmp_path / "q.npz", camids=np.zeros(12)),
            "camids must be 12 integers, one per feature, got float64 (12,)",
        ),
        (
            write_npz(tmp_path / "k.npz", masks=np.ones((12, 7), np.float32), **DPM),
            "masks must be floats of the features'",
        ),
        (
            write_npz(tmp_path / "s.npz", masks=np.full((12, 8), "x"), **DPM),
            "masks must be floats of the features' shape",
        ),
        # the model, its distance and its masks agree, as extract writes them (a DPM file without masks failed later,
        # a baseline's labelled cosine was ranked by euclidean distances)
        (write_npz(tmp_path / "a.npz", **DPM), "model dpm needs its features' channel masks, and the file holds no"),
        (
            write_npz(tmp_path / "v.npz", masks=np.ones((12, 8), np.float32)),
            "model vit_baseline has no channel masks, and the file holds a masks array",
        ),
        (
            write_npz(tmp_path / "c.npz", distance="cosine"),
            "distance 'cosine' is not model vit_baseline's test distance",
        ),
        (write_npz(tmp_path / "z.npz", features=np.zeros((12, 0), np.float32)), "non-empty (N, D) float array"),
        (write_npz(tmp_path / "f.npz", features=np.full((12, 8), np.nan, np.float32)), "features contain non-finite"),
        # ranked in float32: a cast's overflow warning and an error naming a distance's "x" before
        (write_npz(tmp_path / "h.npz", features=np.full((12, 8), 1e300)), "features too large for float32 distances"),
        (write_npz(tmp_path / "r.npz", features=np.full((12, 8), 1e19, np.float32)), "norms must stay below 9.22e+18"),
        (write_npz(tmp_path / "n.npz", masks=np.full((12, 8), -0.5, np.float32), **DPM), "masks must lie in [0, 1]"),
        (
            write_npz(tmp_path / "x.npz", distance="foo"),
            "distance 'foo' is not model vit_baseline's test distance 'euclidean'",
        ),
        (write_npz(tmp_path / "b.npz", camids=np.full(12, 2**63, np.uint64)), "camids must fit in int64, got 922337"),
        (array_file, "a single .npy array, not an .npz"),
        (corrupt, "corrupt.npz: not an .npz file"),
    ):
        with pytest.raises(ExportError, match=f"^query .*{re.escape(path.name)}: "):
            load_features_npz(path, "query")
        with pytest.raises(ExportError) as error:
            load_features_npz(path, "--query")
        assert needle in str(error.value)
    saved = load_features_npz(good)
    cases = [
        (dict(gallery=load_features_npz(write_npz(tmp_path / "w.npz", dim=9))), "differ in width: 8 and 9"),
        (
            dict(gallery=load_features_npz(write_npz(tmp_path / "d.npz", masks=np.ones((12, 8), np.float32), **DPM))),
            "different models: vit_baseline and dpm",
        ),
        (
            dict(query=load_features_npz(write_npz(tmp_path / "u.npz", pids=[-1, 0] * 6))),
            "6 of 12 queries have no identity",
        ),
        (
            dict(gallery=load_features_npz(write_npz(tmp_path / "n.npz", pids=[-1] * 12))),
            "no gallery item has an identity",
        ),
        (dict(distance="masked_arccos"), "needs DPM's channel masks; vit_baseline has none"),
        (dict(distance="angular"), "distance must be one of"),
        (dict(rerank=True, k1=0), "k1 must be an integer >= 1 and <= 4611686018427387904, got 0"),
        (dict(lambda_value=1.5), r"lambda_value must be a number in [0, 1], got 1.5"),
        (dict(rerank="GNN"), "rerank must be a bool or one of ('kreciprocal', 'gnn'), got 'GNN'"),
        (dict(aqe=dict(k=0)), "aqe k must be an integer in [1, 256]"),
        (dict(aqe=dict(k=25)), "aqe k must be an integer in [1, 24], got 25"),
        (dict(aqe=dict(alpha=float("nan"))), "aqe: alpha must be a finite number"),
        (dict(aqe=dict(k=24, alpha=0.5)), "aqe: alpha=0.5 gives non-finite weights"),  # negative similarities
        (dict(aqe="yes"), "aqe must be a bool or a dict of ('k', 'alpha', 'times'), got 'yes'"),
        (dict(aqe=dict(beta=1)), "aqe must be a bool or a dict of ('k', 'alpha', 'times'), got {'beta': 1}"),
        (dict(device="gpu"), "device must be a torch.device or a name such as cpu, cuda, cuda:N, got 'gpu'"),
    ]
    if not torch.cuda.is_available():  # was torch's AssertionError "Torch not compiled with CUDA enabled"
        cases.append((dict(device="cuda"), "device: cuda requested but CUDA is not available here"))
    for change, needle in cases:
        arguments = {"query": saved, "gallery": saved, **change}
        with pytest.raises(ValueError) as error:
            rank_features(arguments.pop("query"), arguments.pop("gallery"), **arguments)
        assert needle in str(error.value), (needle, str(error.value))


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--query", "nowhere.npz"], "--query nowhere.npz: not found"),
        (["--rerank", "kreciprocal", "--k2", "0"], "k2 must be an integer >= 1 and <= 4611686018427387904, got 0"),
        (["--device", "cuda:7"], "--device: cuda:7 requested but"),
        (["--device", "cuda:x"], "--device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),  # was a traceback
        (["--device", "mps"], "--device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
        (["--out", "."], "--out . is a directory"),
        # a training run's metrics.json was silently replaced (dpm-reid eval refuses its folder)
        (["--out", "run/metrics.json"], "--out run/metrics.json is a training run's metrics.json"),
    ],
)
def test_rank_command_bad_input_is_one_line(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    write_npz(tmp_path / "q.npz")
    write_npz(tmp_path / "g.npz", seed=3)
    argv = {"--query": "q.npz", "--gallery": "g.npz"}
    argv.update(dict(zip(extra[::2], extra[1::2])))
    code = main(["rank", *[item for pair in argv.items() for item in pair]])
    assert_one_line_error(capsys, code, needle)


def test_rank_command_whose_reader_leaves_is_quiet(tmp_path):
    """`dpm-reid rank ... | head -1`: a write inside the command (unbuffered here, -u) that met the closed pipe
    was reported as "dpm-reid: error: [Errno 32] Broken pipe", exit 2; now main's quiet exit, as for configs."""
    write_npz(tmp_path / "q.npz")
    write_npz(tmp_path / "g.npz", seed=3)
    # run from the test's working folder (the repository): where dpm_ops is built in place, not installed, it imports
    command = f"{sys.executable} -u -m dpm_ops rank --query {tmp_path / 'q.npz'} --gallery {tmp_path / 'g.npz'} | true"
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
    assert done.stderr == "", done.stderr


def test_the_extraction_api_still_answers_at_its_old_place():
    """extract_folder & co. moved from dpm_ops.export to dpm_ops.feature_files: the old names work for one
    release, with a DeprecationWarning naming the new place."""
    import dpm_ops.export as export
    import dpm_ops.feature_files as feature_files

    for name in ("find_images", "extract_folder", "extract_images", "image_cameras", "save_features_npz"):
        with pytest.warns(DeprecationWarning, match=f"dpm_ops.export.{name} moved to dpm_ops.feature_files.{name}"):
            assert getattr(export, name) is getattr(feature_files, name)
    with pytest.raises(AttributeError, match="has no attribute 'extract_everything'"):
        export.extract_everything
