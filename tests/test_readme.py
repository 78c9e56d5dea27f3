"""README.md's Python examples, run as written on small inputs, with the claims of their comments checked
(the Deploy (ONNX) ones run in test_export.py, against exported models).

Each test execs one section's block in a namespace holding the names the block takes as given (`images`,
`distmat`, `qf`, ...). Where a line cannot run here as written (the full-size ViT-B/16, a dataset under /data,
a 10-epoch run of the synthetic set, a CUDA device), the test replaces one fragment of it: each test's
SUBSTITUTIONS, whose left-hand sides must still be in the README, so an edited example fails here rather than
go untested. The signatures and names the sections' tables and bullets write out are checked too, and
the files that the README and the docs/ pages name exist."""

import ast
import builtins
import importlib
import inspect
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpm_ops
from benchmarks.reference import peers
from conftest import README, readme_python_blocks, readme_section
from dpm_ops.cli import main
from dpm_ops.engine import CheckpointError, load_checkpoint, load_config
from dpm_ops.engine.splits import load_splits
from dpm_ops.engine.evaluator import evaluate_model
from dpm_ops.evaluation import evaluate_rank as dpm_evaluate_rank
from dpm_ops.evaluation import pairwise_distance
from dpm_ops.evaluation import re_ranking as dpm_re_ranking
from dpm_ops.losses import DPMLoss
from dpm_ops.models import build_model
from dpm_ops.ops import masked_cosine
from engine_utils import synth_argv, tiny_config, write_config
from test_data_layouts import make_duke_tree
from test_weights import timm_checkpoint

# The sections whose Python blocks run here; test_export.py runs the Deploy (ONNX) ones.
SECTIONS = {
    "api": "API",
    "knn": "Fused k-NN and the re-ranking / evaluation kernels",
    "models": "Models, losses, data, evaluation",
    "compat": "Drop-in replacements for torchreid / fast-reid",
    "engines": "Training and evaluation engines",
}
TESTED_ELSEWHERE = {"Deploy (ONNX)": 2}


def readme_block(section: str) -> str:
    """The one Python block of the README section `section`."""
    (block,) = readme_python_blocks(SECTIONS[section])
    return block


def run_block(section: str, namespace: dict, substitutions: dict[str, str] | None = None) -> dict:
    """Exec the section's block in `namespace` (returned), each fragment of `substitutions` replaced first."""
    block = readme_block(section)
    for fragment, replacement in (substitutions or {}).items():
        assert block.count(fragment) == 1, f"README section {SECTIONS[section]!r} no longer holds {fragment!r}"
        block = block.replace(fragment, replacement)
    exec(compile(block, f"README.md ({SECTIONS[section]})", "exec"), namespace)
    return namespace


def test_every_python_block_of_the_readme_is_run():
    blocks = sum(len(readme_python_blocks(heading)) for heading in SECTIONS.values())
    assert blocks + sum(TESTED_ELSEWHERE.values()) == README.read_text(encoding="utf-8").count("```python\n")
    assert all(len(readme_python_blocks(heading)) == count for heading, count in TESTED_ELSEWHERE.items())


EVALUATE_RANK_ARGUMENTS = ("distmat", "q_pids", "g_pids", "q_camids", "g_camids")


def query_gallery(num_query: int = 6, num_gallery: int = 60, dim: int = 16) -> dict:
    """Features, their Euclidean distances, ids and cameras of a small test set: every query has matches
    on another camera, and the gallery is larger than evaluate_rank's max_rank (50), so no CMC is cut."""
    generator = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(num_query, dim, generator=generator), torch.randn(num_gallery, dim, generator=generator)
    return {
        "qf": qf,
        "gf": gf,
        "distmat": pairwise_distance(qf, gf).numpy(),
        "q_pids": np.arange(num_query),
        "g_pids": np.arange(num_gallery) % 10,
        "q_camids": np.zeros(num_query, dtype=np.int64),
        "g_camids": np.arange(num_gallery) % 3,
    }


def test_api_masked_cosine(capsys):
    generator = torch.Generator().manual_seed(0)
    q, g = torch.randn(5, 768, generator=generator), torch.randn(7, 768, generator=generator)
    q_mask = torch.rand(5, 768, generator=generator)
    ns = run_block("api", {"q": q, "q_mask": q_mask, "g": g})
    x, mask, protos, cos = ns["x"], ns["mask"], ns["protos"], ns["cos"]
    assert cos.shape == (64, 702)
    # < n(x_b), n(m_b * n(p_k)) >, on a few prototypes
    masked_protos = F.normalize(mask[:, None] * F.normalize(protos[:3], dim=1), dim=2)  # (64, 3, 768)
    expected = (F.normalize(x, dim=1)[:, None] * masked_protos).sum(dim=2)
    torch.testing.assert_close(cos[:, :3], expected, atol=1e-5, rtol=1e-5)
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (x, mask, protos))
    clipped = masked_cosine(q, q_mask, g).clamp(-1 + 1e-5, 1 - 1e-5)
    torch.testing.assert_close(ns["dist"], torch.arccos(clipped))
    assert capsys.readouterr().out.strip() == str(dpm_ops.backends())


def test_fused_knn():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 8, generator=generator), torch.randn(20, 8, generator=generator)
    ns = run_block("knn", {"x": x, "y": y, "k": 4, "Q": 5})
    distances, indices = ns["distances"], ns["indices"]
    assert distances.shape == indices.shape == (12, 4) and indices.dtype == torch.int64
    torch.testing.assert_close(distances, torch.cdist(x, y).gather(1, indices))
    assert (distances.diff(dim=1) >= 0).all()
    d, idx, row_max, cross = ns["d"], ns["idx"], ns["row_max"], ns["cross"]
    assert d.shape == idx.shape == (12, 4) and row_max.shape == (12,) and cross.shape == (5, 12 - 5)
    torch.testing.assert_close(cross, torch.cdist(x[:5], x[5:]) ** 2, atol=1e-4, rtol=1e-4)


# The README builds the full-size DPM (ViT-B/16, 145M parameters: ~4 s to build and 4-6 s a forward of two
# images on 2 cores); here its width is cut to 32 (12 blocks, stride 11 and 256 x 128 images kept), and the
# pretrained file is written at that width. The full-size model's parameter counts and patch grid are checked
# on the meta device. The Occluded-Duke tree is written here (test_data_layouts' few images), not read from /data.
SMALL_VIT = {"embed_dim": 32, "num_heads": 4}
MODELS_SUBSTITUTIONS = {
    'build_model("dpm", num_classes=702, num_cameras=8)': 'build_model("dpm", num_classes=702, num_cameras=8, **SMALL_VIT)',
    '"/data"': "DATA_ROOT",
}


def test_full_size_dpm_as_the_models_section_counts_it():
    with torch.device("meta"):
        model = build_model("dpm", num_classes=702, num_cameras=8)
    assert model.backbone.grid_size == (22, 11) and model.backbone.embed_dim == 768  # ViT-B/16 at stride 11
    parameters = dict(model.named_parameters())
    assert sum(p.numel() for p in parameters.values()) == 145_373_184  # with BNNeck and classifier
    test_time = [p for name, p in parameters.items() if not name.startswith(("bottleneck.", "classifier."))]
    assert sum(p.numel() for p in test_time) == 144_832_512


@pytest.mark.filterwarnings("ignore::dpm_ops.data.DatasetCountWarning")
def test_models_losses_data_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the pretrained file is read under the README's name, from the working folder
    torch.save(timm_checkpoint(dim=SMALL_VIT["embed_dim"], depth=12), "jx_vit_base_p16_224-80ecf9dd.pth")
    make_duke_tree(tmp_path / "Occluded_Duke")
    generator = torch.Generator().manual_seed(0)
    pids = torch.tensor([3, 3, 5, 5])  # the triplet term needs a positive and a negative per sample
    namespace = {
        "images": torch.randn(4, 3, 256, 128, generator=generator),
        "cams": torch.tensor([0, 7, 1, 2]),
        "pids": pids,
        "SMALL_VIT": SMALL_VIT,
        "DATA_ROOT": str(tmp_path),
        **query_gallery(),
    }
    ns = run_block("models", namespace, MODELS_SUBSTITUTIONS)

    report = capsys.readouterr().out
    assert report.startswith("LoadReport(layout='timm_vit', loaded=[") and "unexpected=[]" in report
    assert (
        "missing=['backbone.sie_embed', 'bottleneck.bias'" in report
        and "dropped=['head.bias', 'head.weight']" in report
    )

    out = ns["out"]
    assert out._fields == ("plain_logits", "masked_logits", "feature", "mask", "hem_logits", "margin_labels")
    assert out.plain_logits.shape == out.masked_logits.shape == (4, 702)
    terms = DPMLoss().terms(out, pids)
    weighted = 0.5 * terms["id_plain"] + 0.5 * terms["id_masked"] + 0.1 * terms["hem"] + terms["triplet"]
    torch.testing.assert_close(ns["loss"], weighted)
    torch.testing.assert_close(terms["id_plain"], F.cross_entropy(out.plain_logits, pids))
    assert ns["feature"].shape == ns["mask"].shape == (4, SMALL_VIT["embed_dim"])

    model, main_groups, mask_groups = ns["model"], ns["main_groups"], ns["mask_groups"]
    mask_parameters = {id(p) for group in mask_groups for p in group["params"]}
    assert mask_parameters == {id(p) for p in model.mask_generator.parameters()}
    main_parameters = {id(p) for group in main_groups for p in group["params"]}
    assert main_parameters.isdisjoint(mask_parameters)
    trainable = [p for p in model.parameters() if p.requires_grad]  # BNNeck's bias is frozen
    assert len(main_parameters) + len(mask_parameters) == len(trainable)

    splits = ns["splits"]
    assert (splits.name, len(splits.query), len(splits.gallery)) == ("occluded_duke", 2, 3)

    result, expected = ns["result"], dpm_evaluate_rank(*(namespace[k] for k in EVALUATE_RANK_ARGUMENTS))
    assert (result.cmc.shape, result.mAP, result.mINP) == ((50,), expected.mAP, expected.mINP)
    np.testing.assert_array_equal(result.cmc, expected.cmc)
    np.testing.assert_array_equal(result.all_AP, expected.all_AP)
    # "exact k-reciprocal re-ranking": re_ranking's on the features' Euclidean distances (the shape alone
    # passed for any (6, 60) output), within rerank_features' float tolerance
    qf, gf = namespace["qf"], namespace["gf"]
    distances = (pairwise_distance(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    expected_reranked = dpm_re_ranking(*distances, k1=20, k2=6, lambda_value=0.3)
    assert ns["reranked"].shape == (6, 60)
    np.testing.assert_allclose(np.asarray(ns["reranked"]), expected_reranked, rtol=0, atol=1e-5)
    assert not np.allclose(expected_reranked, namespace["distmat"], atol=1e-2)  # re-ranking changed them
    # fast-reid's TEST.ROC numbers: its evaluate_roc, sklearn's roc_curve and its evaluator's pick
    assert ns["tprs"].shape == (3,)
    want = peers.fastreid_tpr_at_fpr(*(namespace[k] for k in EVALUATE_RANK_ARGUMENTS))
    np.testing.assert_array_equal(ns["tprs"], want)


def test_torchreid_and_fastreid_drop_ins():
    namespace = query_gallery()
    ns = run_block("compat", dict(namespace))
    expected = dpm_evaluate_rank(*(namespace[k] for k in EVALUATE_RANK_ARGUMENTS))
    assert ns["evaluate_rank"].__module__ == "dpm_ops.compat.fastreid"  # the block's last import wins
    assert isinstance(ns["mAP"], float) and ns["mAP"] == pytest.approx(expected.mAP)  # torchreid's (cmc, mAP)
    cmc, all_AP, all_INP = ns["cmc"], ns["all_AP"], ns["all_INP"]  # fast-reid's
    assert cmc.shape == (50,)
    np.testing.assert_allclose(cmc, expected.cmc)  # its values, not only its length
    assert all_AP.dtype == all_INP.dtype == np.float64  # float64 arrays, as the list of differences says
    np.testing.assert_allclose(all_AP, expected.all_AP)
    np.testing.assert_allclose(all_INP, expected.all_INP)


# The README trains the built-in synthetic_dpm config for 10 epochs (its 300-identity set, minutes): here the
# tiny config of the engine tests, one epoch, on the tiny synthetic set; on the CPU when there is no GPU.
ENGINES_SUBSTITUTIONS = {
    'load_config("synthetic_dpm", ["solver.epochs=10"])': 'load_config(TINY_CONFIG, ["solver.epochs=1"])',
    **({} if torch.cuda.is_available() else {'device="cuda"': 'device="cpu"'}),
}


@pytest.mark.filterwarnings("ignore:evaluate_rank. max_rank 50 exceeds the gallery size")  # the tiny gallery
def test_training_and_evaluation_engines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the block writes runs/ into the working folder
    root = tmp_path / "set"
    assert main(synth_argv(root)) == 0
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config(root, "dpm"))
    # `model` and `splits` as the Models section makes them: a DPM at the recipe's input size, a test set
    splits = load_splits(load_config(str(config_path), []))
    model = build_model("dpm", num_classes=702, num_cameras=8, **SMALL_VIT)
    ns = run_block(
        "engines", {"TINY_CONFIG": str(config_path), "model": model, "splits": splits}, ENGINES_SUBSTITUTIONS
    )
    assert ns["config"]["solver"]["epochs"] == 1
    result = ns["result"]
    assert result["finished"] and 0 <= result["metrics"]["occluded"]["rank1"] <= 100
    assert ns["state"]["model_name"] == "dpm"
    with pytest.raises(CheckpointError, match="vit_baseline"):  # "CheckpointError if another model"
        load_checkpoint("runs/demo/checkpoints/final.pt", model_name="vit_baseline")
    metrics = ns["metrics"]
    assert set(metrics) == {"all", "clean", "occluded"}
    assert set(metrics["all"]) >= {"rank1", "rank5", "rank10", "mAP", "mINP", "num_query", "num_valid", "cmc"}
    eval_dir = tmp_path / "runs" / "occ_duke" / "eval"
    for written in ("metrics.json", "cmc.png", "ranked_best.png", "ranked_worst.png", "masks.png"):
        assert (eval_dir / written).is_file(), written
    table = capsys.readouterr().out
    assert "queries     Rank-1  Rank-5  Rank-10     mAP    mINP  #queries" in table


def written_parameters(arguments: str) -> dict[str, object]:
    """{name: default} of a signature as the README writes it (`a, b=1, mode="avg" | "max", *, **options`):
    inspect.Parameter.empty where none is given, the first choice of `|`-separated ones; `*` is left out."""
    parameters = {}
    for argument in (a.strip() for a in arguments.replace("\\|", "|").split(",")):
        if argument == "*":
            continue
        name, _, default = argument.lstrip("*").partition("=")
        parameters[name] = ast.literal_eval(default.split("|")[0].strip()) if default else inspect.Parameter.empty
    return parameters


def assert_written_signature(function, arguments: str, *, complete: bool) -> None:
    """The README's parameters are the function's, in its order and with its defaults: all of them
    (`complete`) or some. backend= may go unwritten: the sections describe it once for every op."""
    written = written_parameters(arguments)
    actual = {n: p.default for n, p in inspect.signature(function).parameters.items() if n in written or n != "backend"}
    if complete:
        assert list(written.items()) == list(actual.items()), function.__name__
    else:
        assert [(n, default) for n, default in actual.items() if n in written] == list(written.items())


def test_the_other_fused_ops_table_gives_their_signatures():
    rows = re.findall(r"^\| `(\w+)\((.*?)\)` \|", readme_section("The other fused ops"), re.M)
    assert [name for name, _ in rows] == [
        "hierarchical_mask_pool",
        "masked_arcface_ce",
        "batch_hard_triplet",
        "maskreid_ranking_loss",
        "hem_loss",
    ]
    for name, arguments in rows:
        assert_written_signature(getattr(dpm_ops.ops, name), arguments, complete=True)


# Signatures written out in the sections' bullet lists (evaluate_model's leaves four options to a sentence).
BULLET_SIGNATURES = [
    ("API", "masked_cosine", dpm_ops.ops.masked_cosine, True),
    ("Models, losses, data, evaluation", "dpm_ops.models.build_model", build_model, True),
    ("Models, losses, data, evaluation", "evaluate_rank", dpm_evaluate_rank, True),
    ("Models, losses, data, evaluation", "re_ranking", dpm_re_ranking, True),
    ("Training and evaluation engines", "evaluate_model", evaluate_model, False),
]


@pytest.mark.parametrize("heading, written_name, function, complete", BULLET_SIGNATURES)
def test_signatures_in_the_bullets(heading, written_name, function, complete):
    (arguments,) = re.findall(rf"`{re.escape(written_name)}\((.*?)\)`", readme_section(heading), re.S)
    assert_written_signature(function, " ".join(arguments.split()), complete=complete)


def test_the_module_bullets_name_what_the_modules_hold():
    """Each `- `dpm_ops.<module>`: ...` bullet's functions (written called) and classes are that module's."""
    section = readme_section("Models, losses, data, evaluation")
    bullets = re.findall(r"^- `(dpm_ops\.\w+)`: (.*?)(?=^- |\Z)", section, re.M | re.S)
    assert [module for module, _ in bullets] == ["dpm_ops.losses", "dpm_ops.data", "dpm_ops.evaluation"]
    for module_name, bullet in bullets:
        module = importlib.import_module(module_name)
        called = set(re.findall(r"`(\w+)\(", bullet)) - set(dir(builtins))  # not `min(max_rank, G)`
        names = called | set(re.findall(r"`([A-Z]\w*)`", bullet))
        assert names and not [name for name in names if not hasattr(module, name)], module_name


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/certified_knn.md"])
def test_the_files_the_docs_name_exist(doc):
    """Every `path/like/this` a page writes is a file or folder of the repository (paths inside the
    package and csrc/ may drop their `dpm_ops/` or `csrc/` prefix; `module.name` names a module's member)."""
    root = README.parent
    text = (root / doc).read_text(encoding="utf-8")

    def exists(written: str) -> bool:
        path = written.rstrip("/")
        module, _, member = path.rpartition(".")
        candidates = [path] + ([f"{module}.py"] if member.isidentifier() and "/" in module else [])
        return any((root / prefix / c).exists() for prefix in ("", "dpm_ops", "csrc") for c in candidates)

    written = set(re.findall(r"`([\w.-]+(?:/[\w.-]+)+/?)`", text))
    missing = sorted(w for w in written if not exists(w))
    assert written and not missing, f"{doc} names files that are not there: {missing}"


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/certified_knn.md"])
def test_the_dotted_names_the_docs_write_evaluate(doc):
    """Every `dpm_ops.a.b` a page writes evaluates as written after `import dpm_ops.a.b` (or its longest
    importable prefix): attribute by attribute from the package, so a module shadowed by a function of the
    same name (`dpm_ops.ops.knn` is the function) is caught."""
    names = set(re.findall(r"`(dpm_ops(?:\.\w+)+)", (README.parent / doc).read_text(encoding="utf-8")))
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            try:
                importlib.import_module(".".join(parts[:end]))
                break
            except ImportError:
                continue
        obj = dpm_ops
        for part in parts[1:]:
            obj = getattr(obj, part, missing)
        if obj is missing:
            missing.append(name)
    assert not missing, f"{doc} writes names that do not evaluate: {missing}"
