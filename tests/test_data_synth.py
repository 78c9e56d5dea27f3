"""The synthetic occluded re-ID set: determinism, Market layout, masks, manifest and CLI."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from dpm_ops.data import DatasetError, build_dataset
from dpm_ops.data.masks import mask_path_for
from dpm_ops.data.synth import (
    SynthConfig,
    SynthOptionError,
    check_synthetic_dataset,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    main,
)
from engine_utils import tiny_synth_config

TINY = tiny_synth_config(ids=8, train_images=(3, 4), distractors=0.2, junk=0.2)

MARKET_NAME = re.compile(r"^(\d{4}|-1)_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "set", TINY, progress=False)


def file_bytes(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tiny_set, tmp_path):
    again = generate_synthetic_dataset(tmp_path / "again", TINY, progress=False)
    assert file_bytes(tiny_set) == file_bytes(again)
    other = generate_synthetic_dataset(tmp_path / "other", SynthConfig(**{**TINY.__dict__, "seed": 4}), progress=False)
    assert file_bytes(other) != file_bytes(tiny_set)


def test_market_layout_names_and_image_size(tiny_set):
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        names = os.listdir(tiny_set / folder)
        assert names and all(MARKET_NAME.match(name) for name in names), names
        masks = sorted(os.listdir(tiny_set / f"{folder}_seg"))
        assert masks == sorted(name[:-4] + ".png" for name in names)
    assert all(MARKET_NAME.match(n).group(5) == "00" for n in os.listdir(tiny_set / "query"))
    assert all(1 <= int(MARKET_NAME.match(n).group(2)) <= 3 for n in os.listdir(tiny_set / "bounding_box_test"))
    any_image = next((tiny_set / "query").iterdir())
    with Image.open(any_image) as image:
        assert image.size == (32, 64) and image.mode == "RGB"


def test_loader_reads_it_with_masks_and_exact_counts(tiny_set):
    data = build_dataset("synthetic", tiny_set, with_masks=True)  # counts checked in error mode
    manifest = json.loads((tiny_set / "synthetic.json").read_text())
    assert manifest["format"] == "dpm_ops.synthetic/1" and manifest["config"]["seed"] == 3
    assert [len({r.pid for r in data.train}), len(data.train)] == manifest["counts"]["train"]
    assert data.junk_dropped > 0 and any(r.pid == 0 for r in data.gallery)
    assert data.num_train_pids == 4 and data.num_cams == 3
    test_ids = {r.pid for r in data.query}
    assert not test_ids & set(data.train_pid_map), "train and test identities must be disjoint"
    for query in data.query:  # every query has a true match in another camera
        assert any(g.pid == query.pid and g.camid != query.camid for g in data.gallery)
    assert len(data.mask_paths) == len(data.train) + len(data.query) + len(data.gallery) + data.junk_dropped


def test_occluded_queries_are_recorded_and_lose_visible_body(tiny_set):
    data = build_dataset("synthetic", tiny_set, with_masks=True)
    manifest = json.loads((tiny_set / "synthetic.json").read_text())
    occluded = [r for r in data.query if data.is_occluded(r)]
    clean = [r for r in data.query if not data.is_occluded(r)]
    assert occluded and clean
    for key, entry in manifest["occlusion"].items():
        assert (tiny_set / key).is_file()
        assert entry["occluder"] in ("ground", "side", "pole", "board", "person")
        assert 0.05 <= entry["hidden"] < 1.0

    def visible(record):
        return (np.asarray(Image.open(data.mask_paths[record.path])) > 0).mean()

    assert np.mean([visible(r) for r in occluded]) < 0.85 * np.mean([visible(r) for r in clean])


def test_refuses_to_overwrite_unless_forced_and_synthetic(tiny_set, tmp_path):
    with pytest.raises(DatasetError, match="--force"):
        generate_synthetic_dataset(tiny_set, TINY, progress=False)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        generate_synthetic_dataset(foreign, TINY, progress=False, force=True)
    assert (foreign / "holiday.jpg").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_what_arrives_in_the_folder_during_a_generation_is_kept(tiny_set, tmp_path, monkeypatch):
    """The folder was checked when the generation started only: a file written there meanwhile (or another
    generation's set) was deleted with the folder when the new set took its place."""
    from dpm_ops.data.synth import writing

    out = tmp_path / "set"
    out.mkdir()
    render = writing._render

    def render_and_write_a_file(*args):
        (out / "results.txt").write_text("mine")  # another program writes into the empty folder meanwhile
        return render(*args)

    monkeypatch.setattr(writing, "_render", render_and_write_a_file)
    with pytest.raises(DatasetError, match=r"output folder is not empty: .*set \(it is not a synthetic dataset"):
        generate_synthetic_dataset(out, TINY, progress=False)
    assert (out / "results.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["results.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # the staged set is cleaned up


def test_numpy_numbers_are_options_like_pythons(tiny_set, tmp_path):
    """numpy ints and floats passed the checks, then the manifest's json.dumps failed after every image was drawn."""
    options = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY)}
    as_numpy = SynthConfig(**{**options, "ids": np.int64(TINY.ids), "train_images": tuple(np.array(TINY.train_images))})
    assert as_numpy == TINY and type(as_numpy.ids) is int and all(type(v) is int for v in as_numpy.train_images)
    assert type(SynthConfig(**{**options, "junk": np.float32(0.25)}).junk) is float
    out = generate_synthetic_dataset(tmp_path / "set", as_numpy, progress=False)
    assert file_bytes(out) == file_bytes(tiny_set)


def test_ensure_reuses_a_matching_set(tmp_path):
    config = SynthConfig(**{**TINY.__dict__, "ids": 4, "distractors": 0.0, "junk": 0.0})
    out = ensure_synthetic_dataset(tmp_path / "set", config, progress=False)
    stamp = (out / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset(out, config, progress=False) == out
    assert (out / "synthetic.json").stat().st_mtime_ns == stamp


def test_ensure_refuses_a_set_of_other_options(tmp_path):
    # Before: ensure_synthetic_dataset regenerated over it (and prepare_synthetic reused it as is).
    config = SynthConfig(**{**TINY.__dict__, "ids": 4, "distractors": 0.0, "junk": 0.0})
    out = ensure_synthetic_dataset(tmp_path / "set", config, progress=False)
    before = file_bytes(out)
    other = dataclasses.replace(config, seed=9, junk=0.5)
    with pytest.raises(
        DatasetError,
        match=r"set was generated with other options \(junk 0.5 requested, 0.0 there; seed 9 requested, 3 there\); use another folder, or delete the folder",
    ):
        ensure_synthetic_dataset(out, other, progress=False)
    assert file_bytes(out) == before
    manifest = json.loads((out / "synthetic.json").read_text())
    # an option only one side knows (a set of an older or newer version) differs too
    older = {**manifest, "config": {k: v for k, v in manifest["config"].items() if k != "jpeg_quality"}}
    (out / "synthetic.json").write_text(json.dumps(older))
    with pytest.raises(DatasetError, match=r"jpeg_quality 90 requested, \(absent\) there"):
        check_synthetic_dataset(out, config)
    (out / "synthetic.json").write_text(json.dumps({**manifest, "format": "dpm_ops.synthetic/0"}))
    with pytest.raises(DatasetError, match=r"manifest format 'dpm_ops.synthetic/0'"):
        check_synthetic_dataset(out, config)
    (out / "synthetic.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"corrupt synthetic manifest .*synthetic\.json: it holds no config"):
        check_synthetic_dataset(out, config)
    (out / "synthetic.json").write_text('{"config": ')
    with pytest.raises(DatasetError, match=r"corrupt synthetic manifest .*synthetic\.json: Expecting value"):
        check_synthetic_dataset(out, config)
    with pytest.raises(DatasetError, match=r"corrupt synthetic manifest .*synthetic\.json: Expecting value"):
        build_dataset("synthetic", out)
    assert not check_synthetic_dataset(tmp_path / "absent", config)


def test_an_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    from dpm_ops.data.synth import writing

    render = writing._render
    calls = []

    def render_then_die(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-way
        return render(*args)

    monkeypatch.setattr(writing, "_render", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_dataset(tmp_path / "set", TINY, progress=False)
    assert os.listdir(tmp_path) == []  # neither the set nor its staging folder


def test_a_run_refuses_a_set_of_other_dataset_synth_options(tmp_path, capsys):
    from dpm_ops.engine.splits import prepare_synthetic
    from dpm_ops.engine.config import load_config
    from engine_utils import TINY_SYNTH

    root = tmp_path / "set"

    def config(*overrides):
        given = {f"dataset.synth.{key}": json.dumps(value) for key, value in TINY_SYNTH.items()}
        given.update(text.split("=", 1) for text in overrides)  # each key once: the test's over the tiny set's
        return load_config(None, [f"dataset.root={root}", *(f"{key}={value}" for key, value in given.items())])

    prepare_synthetic(config(), progress=False)
    assert "generating the synthetic dataset" in capsys.readouterr().err
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    prepare_synthetic(config(), progress=False)  # the same options: reused
    with pytest.raises(DatasetError) as info:
        prepare_synthetic(config("dataset.synth.ids=30", "dataset.synth.width=48"), progress=False)
    message = str(info.value)
    assert str(root) in message and "dataset.synth.ids 30 requested, 20 there" in message, message
    assert "dataset.synth.width 48 requested, 32 there" in message and "set another dataset.root" in message
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    prepare_synthetic(config("dataset.synth.ids=30", "dataset.generate=false"), progress=False)  # not generating


def test_a_run_checks_a_synthetic_sets_counts_unless_told_off(tiny_set, tmp_path):
    # the manifest's counts are exact, so the config's default ("warn", for partial copies of the published
    # sets) reads a synthetic set in error mode; dataset.check_counts=off reads a set with an image missing
    from dpm_ops.engine.splits import load_splits
    from dpm_ops.engine.config import load_config

    root = tmp_path / "set"
    shutil.copytree(tiny_set, root)
    full = len(build_dataset("synthetic", tiny_set).gallery)
    sorted((root / "bounding_box_test").glob("0*.jpg"))[-1].unlink()  # not a junk (-1) image

    def config(*overrides):
        return load_config(None, [f"dataset.root={root}", "dataset.generate=false", *overrides])

    for overrides in ([], ["dataset.check_counts=error"]):
        with pytest.raises(
            DatasetError, match=rf"^synthetic gallery: .* / {full - 1} images, the full dataset has .* / {full} images$"
        ):
            load_splits(config(*overrides))
    assert len(load_splits(config("dataset.check_counts=off")).gallery) == full - 1


def test_cli(tmp_path, capsys, monkeypatch):
    out = tmp_path / "data" / "synthetic" / "cli"  # folders that do not exist yet are made
    args = [
        "--out",
        str(out),
        "--seed",
        "1",
        "--ids",
        "4",
        "--cameras",
        "2",
        "--width",
        "16",
        "--height",
        "32",
        "--train-images",
        "2,3",
        "--quiet",
    ]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "synthetic.json").read_text())
    assert manifest["config"]["cameras"] == 2 and manifest["config"]["train_images"] == [2, 3]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    # --force replaces the set, never a run or anything else put in its folder
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "final.pt").write_bytes(b"weights")
    assert main(args + ["--force"]) == 2
    assert "holds a synthetic dataset and other files (checkpoints); --force replaces only" in capsys.readouterr().err
    assert (out / "checkpoints" / "final.pt").read_bytes() == b"weights"
    monkeypatch.chdir(tmp_path)  # an empty --out was the current folder
    assert main(["--out", "", "--quiet"]) == 2
    assert "the output folder must be a path, got ''" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "bad"), "--cameras", "12", "--quiet"]) == 2
    assert "--cameras: must be an integer in 2..9" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "bad"), "--query-occlusion", "1.5"]) == 2
    assert "--query-occlusion: must be a probability in [0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--junk", "nan", "--junk: must be a finite non-negative share <= 10, got nan"),
        ("--distractors", "-0.5", "--distractors: must be a finite non-negative share"),
        ("--distractors", "1e9", "--distractors: must be a finite non-negative share <= 10, got 1000000000.0"),
        # Before: an OSError from the JPEG writer (65535 at most) after drawing the first image
        ("--height", "70000", "--height: must be an integer in 32..1024"),
        ("--width", "100000", "--width: must be an integer in 16..512"),
        ("--train-images", "2,100000", "--train-images: must be integers LOW,HIGH with 1 <= LOW <= HIGH <= 200"),
        ("--gallery-per-camera", "1,51", "--gallery-per-camera: must be integers LOW,HIGH with 1 <= LOW <= HIGH <= 50"),
        (
            "--queries-per-id",
            "7",
            "--queries-per-id: must be an integer in 1..4 (at most one query per (id, camera), an identity in at most "
            "id_cameras[1] = 4 cameras)",
        ),
        ("--seed", "-1", "--seed: must be an integer >= 0"),
        ("--ids", "1", "--ids: must be an integer in 2..4999"),
        ("--width", "8", "--width: must be an integer in 16..512"),
        ("--train-occlusion", "inf", "--train-occlusion: must be a probability in [0, 1], got inf"),
        ("--gallery-per-camera", "0,2", "--gallery-per-camera: must be integers LOW,HIGH with 1 <= LOW <= HIGH"),
        ("--train-images", "3,1", "--train-images: must be integers LOW,HIGH"),
    ],
)
def test_cli_bad_option_is_one_line_naming_it(tmp_path, capsys, option, value, needle):
    assert main(["--out", str(tmp_path / "set"), option, value, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dpm-reid synth: error: {needle}"), err
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("value", ["a,b", "1,2,3", "2.5", "3,", ",3"])
def test_cli_range_that_does_not_parse_is_an_argparse_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "set"), "--train-images", value, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err  # one line, no usage block
    needle = f"dpm-reid synth: error: argument --train-images: expected N or LOW,HIGH, got {value!r}"
    assert err[0] == f"{needle} (see dpm-reid synth --help)"
    assert not (tmp_path / "set").exists()


def test_options_within_bounds_but_too_many_images_together(tmp_path, capsys):
    args = ["--out", str(tmp_path / "set"), "--ids", "4999", "--train-images", "200,200", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ids: with these options the set may hold up to 5" in err[0], err
    assert "more than 500,000" in err[0] and not (tmp_path / "set").exists()
    with pytest.raises(SynthOptionError, match="supersample"):
        SynthConfig(supersample=5)


def test_cli_unusable_out_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, needle in (
        (a_file, "output path exists and is not a folder"),
        (a_file / "set", f"cannot create the output folder {a_file / 'set'}: {a_file} is a file"),
        (tmp_path / ("x" * 300), "File name too long: "),  # a traceback
    ):
        assert main(["--out", str(out), "--ids", "4", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dpm-reid synth: error: --out: ") and needle in err[0], err


def test_synth_config_names_the_field():
    from dpm_ops.data.synth import SynthOptionError

    for fields, option in (
        ({"hidden_range": (0.5, 0.2)}, "hidden_range"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"ids": "20"}, "ids"),
        ({"junk": float("nan")}, "junk"),
        ({"cameras": 3, "id_cameras": (2, 4)}, "id_cameras"),
    ):
        with pytest.raises(SynthOptionError) as info:
            SynthConfig(**fields)
        assert info.value.option == option and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "fields, option",
    [
        ({"seed": True}, "seed"),  # a bool is no integer
        ({"seed": -1}, "seed"),
        ({"ids": 1}, "ids"),
        ({"cameras": 3, "id_cameras": (2, 3), "queries_per_id": 4}, "queries_per_id"),  # one per (id, camera)
        # more than an identity's cameras were cut to them silently
        ({"cameras": 9, "id_cameras": (2, 4), "queries_per_id": 9}, "queries_per_id"),
        ({"supersample": 5}, "supersample"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"id_cameras": (1, 2)}, "id_cameras"),  # an identity in one camera has no cross-camera match
        ({"train_images": (1, 201)}, "train_images"),
        ({"gallery_per_camera": (0, 2)}, "gallery_per_camera"),
        ({"hidden_range": (0.0, 0.5)}, "hidden_range"),
        ({"hidden_range": (0.5, 1.0)}, "hidden_range"),
    ],
)
def test_synth_options_out_of_range(fields, option):
    with pytest.raises(SynthOptionError) as info:
        SynthConfig(**fields)
    assert info.value.option == option


def test_synth_options_at_their_bounds_are_accepted():
    for fields in (
        {"seed": 0, "ids": 2, "cameras": 2, "id_cameras": (2, 2), "queries_per_id": 2},
        {"supersample": 4, "jpeg_quality": 100, "hidden_range": (0.01, 0.99)},
        {"supersample": 1, "jpeg_quality": 1, "train_images": (200, 200), "gallery_per_camera": (50, 50), "ids": 2},
    ):
        SynthConfig(**fields)
    # exactly the most images a set may hold (2000 * 200 + 2000 * (2 + 4 * 12) = 500,000)
    most = dict(ids=4000, train_images=(1, 200), gallery_per_camera=(1, 12), distractors=0.0, junk=0.0)
    assert SynthConfig(**most).max_images() == 500_000


def test_max_images_counts_every_kind_of_image():
    config = SynthConfig(
        ids=9,  # 5 train, 4 test identities
        cameras=4,
        id_cameras=(2, 3),
        queries_per_id=3,  # at most one per camera: 3 per identity
        train_images=(1, 5),
        gallery_per_camera=(1, 2),
        distractors=0.5,
        junk=0.25,
    )
    train, queries, gallery = 5 * 5, 4 * 3, 4 * 3 * 2
    assert config.max_images() == train + queries + gallery * (1 + 0.5 + 0.25)


def test_plan_follows_the_options():
    """The plan against the options, counted from its jobs: identity splits, cameras per identity
    and images per identity within their inclusive ranges (both ends reached over 200 identities),
    one query per camera up to queries_per_id, distractor and junk shares of the identities' gallery."""
    from collections import Counter

    from dpm_ops.data.synth.planning import plan_images, split_counts

    config = SynthConfig(
        seed=3,
        ids=201,
        cameras=4,
        id_cameras=(2, 3),
        queries_per_id=2,
        train_images=(1, 3),
        gallery_per_camera=(1, 2),
        distractors=0.5,
        junk=0.25,
    )
    jobs, pids = plan_images(config)
    by_folder = {folder: [j for j in jobs if j.folder == folder] for folder in ("bounding_box_train", "query")}
    train_ids = {j.identity for j in by_folder["bounding_box_train"]}
    test_ids = {j.identity for j in jobs if j.folder == "bounding_box_test" and j.identity >= 0}
    assert (len(train_ids), len(test_ids)) == (101, 100) and not train_ids & test_ids
    assert set(Counter(j.identity for j in by_folder["bounding_box_train"]).values()) == {1, 2, 3}
    gallery = [j for j in jobs if j.folder == "bounding_box_test" and j.identity >= 0]
    cameras = {i: {j.camera for j in gallery if j.identity == i} for i in test_ids}
    assert {len(c) for c in cameras.values()} == {2, 3}
    assert set(Counter((j.identity, j.camera) for j in gallery).values()) == {1, 2}
    queries = Counter(j.identity for j in by_folder["query"])
    assert set(queries.values()) == {2} and len(set((j.identity, j.camera) for j in by_folder["query"])) == 200
    assert all(j.camera in cameras[j.identity] for j in by_folder["query"])
    one_offs = [j for j in jobs if j.identity < 0]
    assert sum(not j.junk for j in one_offs) == round(0.5 * len(gallery))
    assert sum(j.junk for j in one_offs) == round(0.25 * len(gallery))
    assert all(j.name.startswith("-1_" if j.junk else "0000_") for j in one_offs)
    frames = {}  # per camera, strictly increasing frame numbers: names never repeat
    for job in jobs:
        frames.setdefault(job.camera, []).append(int(job.name.split("_")[2]))
    assert all(a < b for f in frames.values() for a, b in zip(f, f[1:]))
    counts = split_counts(jobs, pids)
    assert counts["gallery"] == [100 + 1, len(gallery) + round(0.5 * len(gallery))]  # pid 0 is one id, junk dropped


def test_config_and_command_line_agree_on_id_cameras():
    # a config with cameras: 2 alone was refused for id_cameras (2, 4), which `dpm-reid synth --cameras 2` caps
    from dpm_ops.data.synth import synth_config

    assert synth_config({"ids": 8, "cameras": 2}).id_cameras == (2, 2)
    assert synth_config({"cameras": 6}).id_cameras == (2, 4)
    assert synth_config({"cameras": 3, "id_cameras": [2, 3]}).id_cameras == (2, 3)


# The images' own statistics: what makes the set a re-ID set rather than files with the right names
# (the tests above would pass on noise). One unoccluded set of 30 test identities, a third of its
# gallery junk boxes.
STATS = tiny_synth_config(
    ids=60, train_images=(1, 1), distractors=0.0, junk=0.3, query_occlusion=0.0, gallery_occlusion=0.0
)


@pytest.fixture(scope="module")
def stats_set(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("stats") / "set", STATS, progress=False)


def image_and_mask(root, path):
    """An image (H, W, 3 float) of the set at ``root`` and its person mask (H, W bool), read from its files."""
    mask = Image.open(mask_path_for(str(path), str(root)))
    return np.asarray(Image.open(path), dtype=np.float64), np.asarray(mask) > 0


def test_an_identity_keeps_its_look_across_cameras(stats_set):
    # Each image as the colour of its upper and lower body (mask rows above / below the middle),
    # per channel relative to the whole body's, which cancels the camera's colour cast: the nearest
    # gallery image of another camera is the query's identity for most queries (chance: 1 in 30).
    data = build_dataset("synthetic", stats_set)

    def look(record):
        image, mask = image_and_mask(stats_set, record.path)
        rows = np.flatnonzero(mask.any(axis=1))
        upper, lower = mask.copy(), mask.copy()
        upper[(rows[0] + rows[-1]) // 2 :] = False
        lower[: (rows[0] + rows[-1]) // 2] = False
        body = image[mask].mean(axis=0)
        return np.concatenate([image[upper].mean(axis=0) / body, image[lower].mean(axis=0) / body])

    query, gallery = np.array([look(r) for r in data.query]), np.array([look(r) for r in data.gallery])
    query_pids, gallery_pids = np.array([r.pid for r in data.query]), np.array([r.pid for r in data.gallery])
    same_camera = np.array([[q.camid == g.camid for g in data.gallery] for q in data.query])
    distance = ((query[:, None] - gallery[None]) ** 2).sum(axis=-1)
    distance[same_camera & (query_pids[:, None] == gallery_pids[None])] = np.inf  # Market's protocol
    assert len(set(gallery_pids)) == 30
    assert (gallery_pids[distance.argmin(axis=1)] == query_pids).mean() >= 0.4


def test_masks_outline_the_drawn_person(stats_set):
    # The mask's edge pixels sit on the person's outline, where the image changes most: their
    # gradient is well above the image's mean (~2.4x here; a mask shifted off the person gives ~1).
    # The person stands upright and fills most of the height (camera scale 0.8-0.92).
    ratios, heights = [], []
    for path in sorted((stats_set / "query").iterdir()):
        image, mask = image_and_mask(stats_set, path)
        gradient = np.hypot(*np.gradient(image.mean(axis=-1)))
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        ratios.append(gradient[mask & ~inner].mean() / gradient.mean())
        heights.append(np.ptp(np.flatnonzero(mask.any(axis=1))) / mask.shape[0])
    assert np.mean(ratios) >= 1.8 and min(ratios) >= 1.0
    assert np.median(heights) >= 0.6


def test_junk_boxes_frame_the_person_badly(stats_set):
    # Junk (pid -1) boxes hold the person half out of frame: the mask's centre sits far from the
    # image's middle, where every other box has it.
    def offset(path):
        mask = image_and_mask(stats_set, path)[1]
        return abs(np.nonzero(mask)[1].mean() - mask.shape[1] / 2) / mask.shape[1] if mask.any() else 0.5

    paths = sorted((stats_set / "bounding_box_test").iterdir())
    junk = [offset(p) for p in paths if p.name.startswith("-1_")]
    framed = [offset(p) for p in paths if not p.name.startswith("-1_")]
    assert len(junk) >= 20 and np.mean(junk) >= 0.2 and np.mean(framed) <= 0.1


def test_each_camera_has_its_own_scene(stats_set):
    # The background (outside the person's mask) of one camera's images is alike and unlike the
    # other cameras': the camera means differ by several times the spread within a camera.
    cameras, backgrounds = [], []
    for folder in ("query", "bounding_box_test"):
        for path in sorted((stats_set / folder).iterdir()):
            image, mask = image_and_mask(stats_set, path)
            cameras.append(int(MARKET_NAME.match(path.name).group(2)))
            backgrounds.append(image[~mask].mean(axis=0))
    cameras, backgrounds = np.array(cameras), np.array(backgrounds)
    means = np.array([backgrounds[cameras == c].mean(axis=0) for c in (1, 2, 3)])
    within = np.mean([backgrounds[cameras == c].std(axis=0).mean() for c in (1, 2, 3)])
    assert means.std(axis=0).mean() >= 2 * within


def test_the_manifest_records_the_share_of_the_body_hidden(tiny_set):
    # An occluded image's job rendered without its occluder draws the same person (the occluder's
    # draws come last): the occluded mask lies inside that one, and the share it lost is the
    # manifest's `hidden` (measured there at the drawing's resolution, before downsampling).
    from dpm_ops.data.synth.planning import plan_images
    from dpm_ops.data.synth.writing import _identities_and_cameras, _render

    jobs, pids = plan_images(TINY)
    identities, cameras = _identities_and_cameras(TINY, pids)
    by_key = {f"{job.folder}/{job.name}": job for job in jobs}
    occlusion = json.loads((tiny_set / "synthetic.json").read_text())["occlusion"]
    assert len(occlusion) >= 5
    errors = []
    for key, entry in occlusion.items():
        job = by_key[key]
        clean = np.asarray(_render(dataclasses.replace(job, occluded=False), TINY, identities, cameras)[1])
        occluded = image_and_mask(tiny_set, tiny_set / key)[1]
        assert not (occluded & ~clean).any(), key
        errors.append(1 - occluded.sum() / clean.sum() - entry["hidden"])
    # downsampling moves single values by up to ~0.04 here, not all of them one way
    assert np.abs(errors).max() <= 0.06 and abs(np.mean(errors)) <= 0.025, errors


def test_a_killed_generations_staging_folder_is_removed_by_the_next(tmp_path):
    """kill -9 during generation left .<set>.partial-<id>/ (a whole set's images at most) for good. The next
    generation next to it removes those whose lock no process holds (or that have none: an older version's), and
    never one a live generation holds."""
    import subprocess
    import sys

    killed = tmp_path / ".set.partial-dead0001"
    (killed / "query").mkdir(parents=True)
    (tmp_path / ".set.partial-dead0001.lock").write_text("")
    older = tmp_path / ".set.partial-old00002"
    older.mkdir()
    live = tmp_path / ".set.partial-live0003"
    live.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); print(1, flush=True); "
            "sys.stdin.read()",
            str(tmp_path / ".set.partial-live0003.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "1"  # the lock is held
        generate_synthetic_dataset(tmp_path / "set", TINY, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".set.partial-live0003",
            ".set.partial-live0003.lock",
            "set",
        ]
    finally:
        holder.communicate("")


def test_a_manifest_of_the_wrong_shape_is_named(tiny_set, tmp_path):
    """Each was a raw KeyError / AttributeError / IsADirectoryError, or silently taken: a string of occluded
    paths read as one-character names (every query clean), 2.7 cameras as 2."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_set, copy)
    manifest = json.loads((copy / "synthetic.json").read_text())
    counts = manifest["counts"]
    for change, message in (
        ({"counts": {**counts, "val": [1, 1]}}, "counts must hold train, query, gallery"),
        ({"counts": {**counts, "train": [1]}}, r"counts must be \[ids, images\] pairs"),
        ({"counts": None}, "counts must hold train, query, gallery, got None"),
        ({"occlusion": "query"}, "occlusion must map image paths relative to the dataset"),
        ({"config": {**manifest["config"], "cameras": 2.7}}, r"config.cameras must be an integer in \[1, 9\], got 2.7"),
    ):
        (copy / "synthetic.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(DatasetError, match=f"corrupt synthetic manifest .*synthetic.json: {message}"):
            build_dataset("synthetic", copy, check_counts="off")
    (copy / "synthetic.json").unlink()
    (copy / "synthetic.json").mkdir()
    with pytest.raises(DatasetError, match="cannot read the synthetic manifest .*synthetic.json: Is a directory"):
        build_dataset("synthetic", copy)


def test_config_edge_cases_and_a_long_output_name(tmp_path):
    """SynthConfig(cameras=3) failed on the default id_cameras (2, 4) it was never given (synth_config alone capped
    it, and not for numpy ints); 10**400 was an OverflowError; a valid long --out name failed on the staging name."""
    assert SynthConfig(cameras=3).id_cameras == (2, 3) == SynthConfig(cameras=np.int64(3)).id_cameras
    assert SynthConfig().id_cameras == (2, 4) and SynthConfig(cameras=9, id_cameras=(3, 5)).id_cameras == (3, 5)
    with pytest.raises(SynthOptionError, match=r"^distractors must be a finite .*, got an integer of 401 digits$"):
        SynthConfig(distractors=10**400)
    with pytest.raises(SynthOptionError, match=r"^hidden_range must .*, got \(0.1, an integer of over 600 digits\)$"):
        SynthConfig(hidden_range=(0.1, 10**5000))
    out = generate_synthetic_dataset(tmp_path / ("d" * 235), tiny_synth_config(ids=4), progress=False)
    assert len(build_dataset("synthetic", out).train) > 0


def test_a_failed_write_names_the_set_and_keeps_the_earlier_one(tmp_path):
    """A full disk while the images were written printed "--out: No space left on device: None" (Pillow's error
    names no file), and named nothing when a run generated its set; the earlier set stays, no staging is left."""
    import sys

    from engine_utils import run_with_file_size_limit, synth_argv

    out = tmp_path / "set"
    generate_synthetic_dataset(out, tiny_synth_config(), progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    argv = [sys.executable, "-m", "dpm_ops", *synth_argv(out), "--force"]
    result = run_with_file_size_limit(argv, 200, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"dpm-reid synth: error: --out: writing the synthetic set {out} failed: File too large"
    ), result.stderr[-2000:]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
