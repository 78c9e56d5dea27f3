"""Pictures: files written, sizes, ranked-list content (frames, junk skipped), bad input."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from dpm_ops import visualize
from dpm_ops.evaluation import evaluate_rank

THUMB = (16, 32)
# ranked-list geometry for THUMB (see plot_ranked_lists' docstring)
CELL_W, ROW_H, TOP = THUMB[0] + 12, THUMB[1] + 8 + 29, 16


def solid(path, colour):
    Image.new("RGB", (20, 40), colour).save(path)
    return str(path)


def png_size(path):
    with Image.open(path) as image:
        return image.size


# ------------------------------------------------------------------------------------ CMC


def test_plot_cmc_inputs(tmp_path):
    metrics = {
        "all": {"rank1": 50.0, "cmc": [50.0, 75.0, 100.0]},
        "occluded": {"cmc": [25.0, 50.0, 100.0]},
        "settings": {"distance": "euclidean"},
    }
    for name, value in [
        ("dict", metrics),
        ("array", np.array([0.5, 0.75, 1.0])),
        ("percent", [10.0, 60.0]),
        ("result", evaluate_rank(np.array([[0.1, 0.2]]), [1], [1, 2], [0], [1, 1])),
    ]:
        out = visualize.plot_cmc(value, tmp_path / f"{name}.png")
        assert png_size(out) == (600, 400) and (tmp_path / f"{name}.png").stat().st_size > 1000


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_plot_cmc_fractions_and_percent_draw_the_same_curve(tmp_path):
    # the sizes above hold whatever the curve: fractions (an array, a RankResult's cmc) must be drawn
    # in percent, as the same percent curve is, not at 0.5 % (the picture of a wrong scale differs)
    percent = pixels(visualize.plot_cmc([50.0, 75.0, 100.0], tmp_path / "percent.png"))
    fractions = pixels(visualize.plot_cmc(np.array([0.5, 0.75, 1.0]), tmp_path / "fractions.png"))
    np.testing.assert_array_equal(fractions, percent)
    result = evaluate_rank(np.array([[0.3, 0.2, 0.1]]), [1], [1, 2, 3], [0], [1, 1, 1])  # match at rank 3
    assert result.cmc.tolist() == [0.0, 0.0, 1.0]
    from_result = pixels(visualize.plot_cmc(result, tmp_path / "result.png"))
    np.testing.assert_array_equal(from_result, pixels(visualize.plot_cmc([0.0, 0.0, 100.0], tmp_path / "p.png")))
    assert not np.array_equal(from_result, percent)  # another curve is another picture


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ([0.9, 0.5], "not a CMC"),
        ([[0.1, 0.2]], "1-D"),
        ([0.1, float("nan")], "NaN"),
        ({"all": {"rank1": 1.0}}, "no CMC"),
        ({"all": {"cmc": [10.0, 5.0]}}, "not a CMC"),
    ],
)
def test_plot_cmc_bad_input(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        visualize.plot_cmc(bad, tmp_path / "cmc.png")
    assert not (tmp_path / "cmc.png").exists()


def test_out_png_must_be_png(tmp_path):
    with pytest.raises(ValueError, match="out_png"):
        visualize.plot_cmc([0.5, 1.0], tmp_path / "cmc.jpg")


# ------------------------------------------------------------------------------------ losses


def test_plot_loss_curves(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [
        json.dumps(
            {
                "step": s,
                "epoch": s // 5,
                "lr": 0.01 * (1 + s),
                "loss": 3.0 - 0.1 * s,
                "loss/id": 2.0 - 0.05 * s,
                "loss/triplet": 1.0 - 0.05 * s,
            }
        )
        for s in range(10)
    ]
    lines.insert(3, "")
    lines.append(json.dumps({"epoch": 1, "eval/mAP": 12.0}))  # no step: ignored
    log.write_text("\n".join(lines) + "\n")
    out = visualize.plot_loss_curves(log, tmp_path / "loss.png")
    assert png_size(out) == (800, 450)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_plot_loss_curves_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        visualize.plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "loss.png")
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": \n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not a JSON line"):
        visualize.plot_loss_curves(log, tmp_path / "loss.png")
    log.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="JSON object"):
        visualize.plot_loss_curves(log, tmp_path / "loss.png")
    log.write_text('{"step": 0, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no line has"):
        visualize.plot_loss_curves(log, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


# ------------------------------------------------------------------------------------ ranked lists


GALLERY_COLOURS = [(250, 250, 0), (0, 250, 250), (250, 0, 250), (120, 60, 0), (0, 0, 250), (250, 128, 0)]
Q_PIDS, Q_CAMS = [1, 2, 3], [0, 0, 0]
G_PIDS, G_CAMS = [1, 1, 2, 9, 3, 2], [0, 1, 1, 1, 1, 0]
DIST = np.array(
    [
        [0.0, 0.1, 0.5, 0.2, 0.9, 0.95],  # g0 is junk (pid 1, cam 0): skipped; match g1 first -> AP 1
        [0.1, 0.2, 0.6, 0.3, 0.4, 0.05],  # g5 junk; match g2 at rank 5 -> AP 0.2
        [0.5, 0.5, 0.5, 0.5, 0.3, 0.5],  # match g4 first -> AP 1
    ]
)


@pytest.fixture
def images(tmp_path):
    queries = [solid(tmp_path / f"q{i}.png", (40 * i, 40 * i, 40 * i)) for i in range(3)]
    gallery = [solid(tmp_path / f"g{i}.png", colour) for i, colour in enumerate(GALLERY_COLOURS)]
    return queries, gallery


def pixel(picture, row, slot, dx, dy):
    x0 = (1 + slot) * CELL_W + 16 if slot >= 0 else 0
    return np.asarray(picture, dtype=int)[row * ROW_H + TOP + dy, x0 + dx, :3]


def assert_slot(picture, row, slot, gallery_index, match):
    centre = pixel(picture, row, slot, 4 + THUMB[0] // 2, 4 + THUMB[1] // 2)
    assert np.abs(centre - GALLERY_COLOURS[gallery_index]).max() <= 3, (row, slot, centre)
    frame = pixel(picture, row, slot, 1, 4 + THUMB[1] // 2)
    assert np.abs(frame - (visualize._MATCH if match else visualize._WRONG)).max() <= 3, (row, slot, frame)


def ranked_lists(queries, gallery, out_png, **options):
    """plot_ranked_lists of the DIST case (its pids and cameras) at THUMB size."""
    return visualize.plot_ranked_lists(
        queries, gallery, DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, out_png, thumb_size=THUMB, **options
    )


def test_plot_ranked_lists_best_and_worst(tmp_path, images):
    queries, gallery = images
    out = ranked_lists(
        queries, gallery, tmp_path / "best.png", which="best", num_queries=2, top_k=3, q_occluded=[True, False, True]
    )
    assert png_size(out) == (4 * CELL_W + 16, 2 * ROW_H)
    with Image.open(out) as picture:
        picture = picture.convert("RGB")
        # best: q0 (AP 1) then q2 (AP 1, later index); q0's junk g0 never shown
        assert_slot(picture, 0, 0, 1, True)
        assert_slot(picture, 0, 1, 3, False)
        assert_slot(picture, 0, 2, 2, False)
        assert_slot(picture, 1, 0, 4, True)
        query_centre = pixel(picture, 1, -1, 4 + THUMB[0] // 2, 4 + THUMB[1] // 2)
        assert np.abs(query_centre - 80).max() <= 3  # q2's grey

    out = ranked_lists(queries, gallery, tmp_path / "worst.png", which="worst", num_queries=1, top_k=10)
    # top_k beyond the gallery: 6 slots, and the row holds the 5 non-junk items only
    assert png_size(out) == (7 * CELL_W + 16, ROW_H)
    with Image.open(out) as picture:
        picture = picture.convert("RGB")
        for slot, (g, match) in enumerate([(0, False), (1, False), (3, False), (4, False), (2, True)]):
            assert_slot(picture, 0, slot, g, match)  # q1: junk g5 (nearest) skipped


def test_query_average_precision_matches_protocol():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a gallery under 50 items: no CMC-cut warning for a CMC never used
        ap = visualize.query_average_precision(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    assert ap == pytest.approx([1.0, 0.2, 1.0])
    ap = visualize.query_average_precision(DIST[:, [0, 3]], Q_PIDS, [1, 9], Q_CAMS, [0, 1])
    assert np.isnan(ap).all()  # q0's only same-pid item is junk


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(which="median"), "which must be 'best' or 'worst', got 'median'"),
        (dict(num_queries=0), "num_queries"),
        (dict(top_k=2.5), "top_k"),
        (dict(distmat=DIST[:2]), "distmat must be"),
        (dict(distmat=DIST * np.nan), "NaN"),
        (dict(q_pids=[1.0, 2.0, 3.0]), "integer"),
        (dict(g_camids=[0, 1]), "g_camids must have length 6"),
        (dict(q_occluded=[True]), "q_occluded must have length 3, got 1"),
        (dict(g_pids=[7, 7, 7, 7, 7, 7]), "no query has"),
    ],
)
def test_plot_ranked_lists_bad_input(tmp_path, images, change, match):
    queries, gallery = images
    arguments = {
        **dict(
            distmat=DIST,
            q_pids=Q_PIDS,
            g_pids=G_PIDS,
            q_camids=Q_CAMS,
            g_camids=G_CAMS,
            out_png=tmp_path / "r.png",
            thumb_size=THUMB,
        ),
        **change,
    }
    with pytest.raises(ValueError, match=match):
        visualize.plot_ranked_lists(queries, gallery, **arguments)


def test_plot_ranked_lists_unreadable_image(tmp_path, images):
    queries, gallery = images
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        ranked_lists([str(tmp_path / "broken.jpg")] + queries[1:], gallery, tmp_path / "r.png")


# ------------------------------------------------------------------------------------ masks


def test_plot_mask_heatmaps(tmp_path, images):
    queries, _ = images
    rng = np.random.default_rng(0)
    masks = rng.random((3, 48))
    population = rng.random((10, 48))
    out = visualize.plot_mask_heatmaps(
        queries,
        masks,
        tmp_path / "masks.png",
        token_maps=rng.random((3, 8, 4)) * 2,
        all_masks=population,
        occluded=[True, False, True],
        all_occluded=[i % 2 == 0 for i in range(10)],
        titles=["a", "b", "c"],
    )
    assert png_size(out) == (700, 960)
    many = [Image.new("RGB", (8, 16), (i * 20, 0, 0)) for i in range(8)]  # PIL images, no token maps
    out = visualize.plot_mask_heatmaps(many, rng.random((8, 5)), tmp_path / "many.png")
    assert png_size(out) == (880, 960)


def test_channel_grid_keeps_channel_order():
    grid = visualize._channel_grid(np.arange(7.0), 3)
    assert grid.shape == (3, 3) and grid[0].tolist() == [0, 1, 2] and np.isnan(grid[2, 1:]).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(masks=np.full((3, 4), 1.5)), r"\[0, 1\]"),
        (dict(masks=np.zeros((2, 4))), "one entry per mask row"),
        (dict(masks=np.zeros((3, 0))), "empty"),
        (dict(token_maps=np.ones((2, 4, 2))), r"token_maps must have one map per mask row \(3\), got 2"),
        (dict(all_masks=np.zeros((5, 3))), "all_masks"),
        (dict(occluded=[True]), "^occluded must have length 3, got 1"),  # not all_occluded's
        (dict(all_occluded=[True, False]), "all_occluded"),
    ],
)
def test_plot_mask_heatmaps_bad_input(tmp_path, images, change, match):
    queries, _ = images
    arguments = {**dict(masks=np.full((3, 4), 0.5), out_png=tmp_path / "m.png"), **change}
    with pytest.raises(ValueError, match=match):
        visualize.plot_mask_heatmaps(queries, **arguments)


def test_images_must_be_paths_pil_or_arrays(tmp_path):
    with pytest.raises(ValueError, match="images must be"):
        visualize.plot_mask_heatmaps([3], np.full((1, 4), 0.5), tmp_path / "m.png")
