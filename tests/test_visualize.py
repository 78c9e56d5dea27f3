"""Pictures: files written, sizes, ranked-list content (frames, junk skipped), bad input."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import record_figures
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
        ("subset", metrics["all"]),  # its "rank1" was read as a curve: "must be 1-D"
        ("array", np.array([0.5, 0.75, 1.0])),
        ("percent", [10.0, 60.0]),
        ("result", evaluate_rank(np.array([[0.1, 0.2]]), [1], [1, 2], [0], [1, 1])),
        ("tensor", torch.tensor([0.5, 1.0], requires_grad=True)),  # a tensor that needs grad is detached
    ]:
        out = visualize.plot_cmc(value, tmp_path / f"{name}.png")
        assert png_size(out) == (600, 400) and (tmp_path / f"{name}.png").stat().st_size > 1000


def test_plot_cmc_of_one_subset_is_its_curve(tmp_path):
    subset = {"rank1": 50.0, "mAP": 40.0, "cmc": [50.0, 75.0, 100.0]}
    one = pixels(visualize.plot_cmc(subset, tmp_path / "subset.png"))
    np.testing.assert_array_equal(one, pixels(visualize.plot_cmc([50.0, 75.0, 100.0], tmp_path / "curve.png")))


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


def test_plot_cmc_figure(tmp_path, monkeypatch):
    figures = record_figures(monkeypatch)
    metrics = {"all": {"cmc": [50.0, 75.0, 100.0]}, "occluded": {"cmc": [25.0, 50.0, 100.0]}, "settings": {}}
    out = visualize.plot_cmc(metrics, tmp_path / "cmc.png", title="CMC: dpm")
    (ax,) = figures[out].axes
    # evaluate_model's curves are in percent already, drawn from rank 1 (not 0)
    assert [line.get_xydata().tolist() for line in ax.lines] == [
        [[1, 50], [2, 75], [3, 100]],
        [[1, 25], [2, 50], [3, 100]],
    ]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["all (R1 50.0%)", "occluded (R1 25.0%)"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title(), ax.get_xlim()) == (
        "rank",
        "matching rate (%)",
        "CMC: dpm",
        (1, 3),
    )
    with Image.open(out) as image:
        assert image.info["dpi"] == pytest.approx((visualize.DPI, visualize.DPI), abs=1e-3)
    # markers up to rank 20 only (a 50-rank curve would be a row of blobs); the default title
    for length, marker in ((20, "o"), (21, "None")):
        out = visualize.plot_cmc(np.linspace(0.05, 1.0, length), tmp_path / f"{length}.png")
        (ax,) = figures[out].axes
        assert (ax.lines[0].get_marker(), ax.get_title()) == (marker, "CMC")


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ([0.9, 0.5], "not a CMC"),
        ([-0.1, 0.5], "not a CMC"),
        ([50.0, 150.0], "not a CMC"),
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


def test_out_png_must_be_png(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="out_png"):
        visualize.plot_cmc([0.5, 1.0], tmp_path / "cmc.jpg")
    # any case of .png; a missing folder is made; the path is returned as given
    monkeypatch.chdir(tmp_path)
    out = visualize.plot_cmc([0.5, 1.0], os.path.join("new", "CMC.PNG"))
    assert out == os.path.join("new", "CMC.PNG") and png_size(tmp_path / out) == (600, 400)


def test_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # the final rename fails
    with pytest.raises(OSError, match="no space left"):
        visualize.plot_cmc([0.5, 1.0], tmp_path / "cmc.png")
    assert os.listdir(tmp_path) == []


def test_an_out_png_that_cannot_be_written_is_refused_before_drawing(tmp_path):
    """A folder of that name failed after the picture was drawn, naming the temporary file."""
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "a_file").write_text("x")
    for out_png, needle in (
        (tmp_path / "taken.png", "is a folder"),
        (tmp_path / "a_file" / "c.png", "cannot create its folder"),
    ):
        with pytest.raises(ValueError, match=f"^out_png .*{needle}"):
            visualize.plot_cmc([0.5, 1.0], out_png)
        with pytest.raises(ValueError, match=f"^out_png .*{needle}"):
            visualize.plot_loss_curves(tmp_path / "missing.jsonl", out_png)


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


def test_plot_loss_curves_figure(tmp_path, monkeypatch):
    figures = record_figures(monkeypatch)
    log = tmp_path / "train_log.jsonl"
    records = [
        {"step": 0, "lr": 0.1, "loss": 3.0, "loss/id": 2.0, "loss_scale": 65536.0},  # loss_scale: no loss term
        {"step": 5, "lr": 0.05, "loss": 2.0, "loss/id": None, "loss/triplet": 0.5},
        {"step": 10, "lr": 0.01, "loss": float("nan"), "loss/id": 1.0, "loss/triplet": True},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = visualize.plot_loss_curves(log, tmp_path / "loss.png")
    ax, twin = figures[out].axes
    # the total first and thicker; a value that is no finite number (null, NaN, true) is skipped
    assert [(line.get_label(), line.get_xydata().tolist(), line.get_linewidth()) for line in ax.lines] == [
        ("loss", [[0, 3], [5, 2]], 2.0),
        ("loss/id", [[0, 2], [10, 1]], 1.0),
        ("loss/triplet", [[5, 0.5]], 1.0),
    ]
    assert twin.lines[0].get_xydata().tolist() == [[0, 0.1], [5, 0.05], [10, 0.01]]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["loss", "loss/id", "loss/triplet", "lr"]
    assert (ax.get_xlabel(), ax.get_ylabel(), twin.get_ylabel()) == ("step", "loss", "learning rate")
    assert ax.get_title() == "training losses (train_log.jsonl)"
    out = visualize.plot_loss_curves(log, tmp_path / "titled.png", title="run 3")
    assert figures[out].axes[0].get_title() == "run 3"


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
    log.write_text('{"step": "0", "loss": 1.0}\n')
    with pytest.raises(ValueError, match="step must be a number, got '0'"):
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
        query_frame = pixel(picture, 1, -1, 1, 4 + THUMB[1] // 2)
        assert np.abs(query_frame - visualize.ranked._QUERY).max() <= 3
        assert picture.getpixel((0, 0)) == (255, 255, 255)  # no axes frame around the mosaic

    out = ranked_lists(queries, gallery, tmp_path / "worst.png", which="worst", num_queries=1, top_k=10)
    # top_k beyond the gallery: 6 slots, and the row holds the 5 non-junk items only
    assert png_size(out) == (7 * CELL_W + 16, ROW_H)
    with Image.open(out) as picture:
        picture = picture.convert("RGB")
        for slot, (g, match) in enumerate([(0, False), (1, False), (3, False), (4, False), (2, True)]):
            assert_slot(picture, 0, slot, g, match)  # q1: junk g5 (nearest) skipped


def test_plot_ranked_lists_texts(tmp_path, images, monkeypatch):
    figures = record_figures(monkeypatch)
    queries, gallery = images
    out = ranked_lists(queries, gallery, tmp_path / "r.png", num_queries=3, top_k=2, q_occluded=[True, False, True])
    texts = [(*text.get_position(), text.get_text(), text.get_color()) for text in figures[out].axes[0].texts]
    below = TOP + THUMB[1] + 9  # a caption's y in its row: under the frame

    def caption(row, slot, text, colour):
        return ((1 + slot) * CELL_W + 16, row * ROW_H + below, text, colour)

    # per row (q0, q2, q1 by AP): the query's label in the top band, then each slot's rank and distance
    assert texts == [
        (0, 2, "query 0: pid 1, cam 0, AP 100.0%, occluded", "black"),
        caption(0, 0, "1: 0.1", "darkgreen"),
        caption(0, 1, "2: 0.2", "darkred"),
        (0, ROW_H + 2, "query 2: pid 3, cam 0, AP 100.0%, occluded", "black"),
        caption(1, 0, "1: 0.3", "darkgreen"),
        caption(1, 1, "2: 0.5", "darkred"),
        (0, 2 * ROW_H + 2, "query 1: pid 2, cam 0, AP 20.0%, clean", "black"),
        caption(2, 0, "1: 0.1", "darkred"),
        caption(2, 1, "2: 0.2", "darkred"),
    ]


def test_plot_ranked_lists_ties_in_gallery_order(tmp_path, images):
    # equal distances rank by gallery index (a stable sort), in a gallery long enough for numpy's
    # default sort to reorder ties
    queries, _ = images
    gallery = [Image.new("RGB", (20, 40), (12 * i, 0, 0)) for i in range(20)]
    distances = np.array([[0.1 if i % 3 == 0 else 0.2 for i in range(20)]])
    g_pids = [5] * 20
    g_pids[3] = 1
    out = visualize.plot_ranked_lists(
        queries[:1], gallery, distances, [1], g_pids, [0], [1] * 20, tmp_path / "r.png", top_k=9, thumb_size=THUMB
    )
    with Image.open(out) as picture:
        picture = picture.convert("RGB")
        for slot, g in enumerate([0, 3, 6, 9, 12, 15, 18, 1, 2]):
            centre = pixel(picture, 0, slot, 4 + THUMB[0] // 2, 4 + THUMB[1] // 2)
            assert np.abs(centre - (12 * g, 0, 0)).max() <= 3, (slot, centre)


def test_plot_ranked_lists_equal_aps_in_query_order(tmp_path, images, monkeypatch):
    # 20 queries, AP 1 and 0.5 alternately: among equal APs the lower query index is shown first
    figures = record_figures(monkeypatch)
    queries = [Image.new("RGB", (20, 40))] * 20
    distances = np.array([[0.1, 0.2], [0.2, 0.1]] * 10)
    for which, shown in (("best", [0, 2, 4]), ("worst", [1, 3, 5])):
        out = visualize.plot_ranked_lists(
            queries,
            images[1][:2],
            distances,
            [1] * 20,
            [1, 2],
            [0] * 20,
            [1, 1],
            tmp_path / f"{which}.png",
            which=which,
            num_queries=3,
            top_k=1,
            thumb_size=THUMB,
        )
        labels = [text.get_text() for text in figures[out].axes[0].texts if text.get_text().startswith("query")]
        assert [int(label.split()[1].rstrip(":")) for label in labels] == shown


def test_plot_ranked_lists_default_thumbnails(tmp_path, images):
    queries, gallery = images
    out = visualize.plot_ranked_lists(
        queries, gallery, DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, tmp_path / "r.png", num_queries=1, top_k=1
    )
    assert png_size(out) == (2 * (64 + 12) + 16, 128 + 8 + 29)  # pedestrian-shaped 64 x 128 thumbnails


def test_query_average_precision_matches_protocol():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a gallery under 50 items: no CMC-cut warning for a CMC never used
        ap = visualize.query_average_precision(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    assert ap == pytest.approx([1.0, 0.2, 1.0])
    unsigned = [np.array(labels, dtype=np.uint8) for labels in (Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)]
    assert visualize.query_average_precision(DIST, *unsigned) == pytest.approx([1.0, 0.2, 1.0])
    ap = visualize.query_average_precision(DIST[:, [0, 3]], Q_PIDS, [1, 9], Q_CAMS, [0, 1])
    assert np.isnan(ap).all()  # q0's only same-pid item is junk


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(which="median"), "which must be 'best' or 'worst', got 'median'"),
        (dict(num_queries=0), "num_queries"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k must be an integer >= 1, got True"),
        (dict(thumb_size=(0, 32)), r"thumb_size must be 2 integers in \[1, 1024\] \(width, height\), got \(0, 32\)"),
        (dict(thumb_size=(10**6, 10**6)), r"thumb_size must be 2 integers in \[1, 1024\]"),  # was killed for memory
        (dict(distmat=np.full((3, 6), "x")), "distmat must hold numbers"),
        (dict(gallery_paths=[], distmat=np.zeros((3, 0)), g_pids=[], g_camids=[]), "distmat is empty"),
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
            query_paths=queries,
            gallery_paths=gallery,
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
        visualize.plot_ranked_lists(**arguments)


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


def test_plot_mask_heatmaps_figure(tmp_path, images, monkeypatch):
    figures = record_figures(monkeypatch)
    queries, _ = images
    mean = np.array([0.1, 0.8, 0.3, 0.9, 0.55, 0.2, 0.7, 0.45])  # channels by mean: 3 1 6 4 7 2 5 0
    population = mean + np.array([[-0.04], [0.04], [-0.02], [0.02]])
    masks = np.stack([np.arange(8) / 10, mean])
    out = visualize.plot_mask_heatmaps(
        queries[:2],
        masks,
        tmp_path / "masks.png",
        token_maps=np.ones((2, 8, 4)),  # a flat mask's maps: all neutral
        all_masks=population,
        occluded=[True, False],
        all_occluded=[True, True, True, False],
        titles=["a", "b"],
    )
    fig = figures[out]
    columns = [fig.axes[4 * i : 4 * i + 4] for i in range(2)]  # per query: image, energy, mask, deviation
    assert len(fig.axes) == 2 * 4 + 3 + 1  # and a colour bar per heat map row, the profile
    assert [ax.get_ylabel() for ax in columns[0]] == ["query", "kept-channel\npatch energy", "mask m", "m − mean m"]
    assert [ax.get_ylabel() for ax in columns[1]] == [""] * 4
    assert [column[0].get_title() for column in columns] == ["a\noccluded\nmean m 0.35", "b\nclean\nmean m 0.50"]
    assert fig.get_suptitle() == (
        "DPM channel masks: 8 channels in a grid, ordered by the mean mask over 4 queries (highest first)"
    )
    # q0's mask and its deviation from the population's mean, channels in that order, 2 per grid row
    mask, deviation = columns[0][2].images[0], columns[0][3].images[0]
    np.testing.assert_allclose(mask.get_array(), [[0.3, 0.1], [0.6, 0.4], [0.7, 0.2], [0.5, 0.0]])
    np.testing.assert_allclose(deviation.get_array(), [[-0.6, -0.7], [-0.1, -0.15], [0.25, -0.1], [0.3, -0.1]])
    np.testing.assert_allclose([mask.get_clim(), deviation.get_clim()], [(0, 1), (-0.7, 0.7)])  # symmetric
    energy = columns[0][1].images[1]  # over the query image, which shows through
    assert energy.norm.vcenter == 1.0 and 0 < energy.get_alpha() < 1
    assert energy.get_extent() == [-0.5, 63.5, 127.5, -0.5]  # spans the whole THUMB-sized image
    profile = fig.axes[-1]
    assert [text.get_text() for text in profile.get_legend().get_texts()] == [
        "clean queries (n=1, mean 0.520)",
        "occluded queries (n=3, mean 0.493)",
    ]
    np.testing.assert_allclose(
        profile.lines[0].get_ydata(), np.array([0.9, 0.8, 0.7, 0.55, 0.45, 0.3, 0.2, 0.1]) + 0.02
    )
    band = profile.collections[1].get_paths()[0].vertices[:, 1]  # the occluded queries' 10-90 % band
    assert (band.min(), band.max()) == pytest.approx((0.1 - 0.036, 0.9 + 0.028))
    assert (profile.get_xlim(), profile.get_xlabel()) == ((0, 7), "channel (ordered by mean mask)")


def test_channel_grid_keeps_channel_order():
    grid = visualize._channel_grid(np.arange(7.0), 3)
    assert grid.shape == (3, 3) and grid[0].tolist() == [0, 1, 2] and np.isnan(grid[2, 1:]).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(masks=np.full((3, 4), 1.5)), r"\[0, 1\]"),
        (dict(masks=np.full((3, 4), -0.1)), r"\[0, 1\]"),
        (dict(images=[], masks=np.zeros((0, 4))), "empty"),
        (dict(all_masks=np.zeros((0, 4))), r"all_masks must be \(N, 4\)"),
        (dict(titles=["a"]), "titles must have length 3, got 1"),
        (dict(masks=np.zeros((2, 4))), "one entry per mask row"),
        (dict(masks=np.zeros((3, 0))), "empty"),
        (dict(token_maps=np.ones((2, 4, 2))), r"token_maps must be one non-empty map per mask row \(3\), got \(2, 4"),
        (dict(token_maps=np.ones((3, 0, 2))), r"token_maps must be one non-empty map per mask row \(3\), got \(3, 0"),
        (dict(all_masks=np.full((5, 4), 25.0)), r"all_masks must lie in \[0, 1\]"),  # was plotted
        (dict(images=None), "images must be a list of image paths, PIL images or arrays, got NoneType"),
        (dict(all_masks=np.zeros((5, 3))), "all_masks"),
        (dict(occluded=[True]), "^occluded must have length 3, got 1"),  # not all_occluded's
        (dict(all_occluded=[True, False]), "all_occluded"),
    ],
)
def test_plot_mask_heatmaps_bad_input(tmp_path, images, change, match):
    queries, _ = images
    arguments = {**dict(images=queries, masks=np.full((3, 4), 0.5), out_png=tmp_path / "m.png"), **change}
    with pytest.raises(ValueError, match=match):
        visualize.plot_mask_heatmaps(**arguments)


def test_images_must_be_paths_pil_or_arrays(tmp_path):
    with pytest.raises(ValueError, match=r"^images\[0\] must be an image path, a PIL image or a uint8 array, got int"):
        visualize.plot_mask_heatmaps([3], np.full((1, 4), 0.5), tmp_path / "m.png")
    assert not list(tmp_path.iterdir())


def test_pictures_are_written_under_long_names_and_failures_name_the_picture(tmp_path):
    """The temporary name added ~15 characters to out_png's: a valid long name failed (File name too long, naming
    the temporary); a refused call created out_png's folders; a 1-entry CMC drew a degenerate axis."""
    long_name = tmp_path / ("c" * 246 + ".png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's identical-xlims warning
        visualize.plot_cmc(np.array([0.5]), long_name)
    assert Image.open(long_name).size == (600, 400) and sorted(p.name for p in tmp_path.iterdir()) == [long_name.name]
    with pytest.raises(ValueError):
        visualize.plot_cmc(np.array([]), tmp_path / "new" / "c.png")
    assert not (tmp_path / "new").exists()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match=r"^out_png .*locked/c.png: cannot create its folder \(.* is not writable"):
            visualize.plot_cmc(np.array([0.5, 1.0]), locked / "c.png")


def test_loss_curves_name_the_file_for_undecodable_or_huge_values(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=r"log.jsonl: not UTF-8 text"):
        visualize.plot_loss_curves(log, tmp_path / "l.png")
    log.write_text('{"step": 1' + "0" * 400 + ', "loss": 1}\n')
    with pytest.raises(ValueError, match=r"log.jsonl: step must be a number"):
        visualize.plot_loss_curves(log, tmp_path / "l.png")
    with pytest.raises(ValueError, match=r"^jsonl_path must be a file path, got NoneType$"):
        visualize.plot_loss_curves(None, tmp_path / "l.png")
