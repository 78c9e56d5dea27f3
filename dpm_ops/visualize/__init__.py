"""Pictures of a training / evaluation run, written as PNG files with matplotlib's Agg backend
(no display needed, nothing is ever shown):

* :func:`plot_cmc`: CMC curves (one per query subset);
* :func:`plot_loss_curves`: every loss term of the trainer's ``train_log.jsonl`` against the
  step, the learning rate on a second axis;
* :func:`plot_ranked_lists`: the top-k gallery images of the best or worst queries, green
  frames for true matches, red for wrong ones (same-pid-same-camera junk removed, as in the
  Market-1501 protocol);
* :func:`plot_mask_heatmaps`: DPM's channel masks (and where in the image the kept channels are).

Every function checks its input and raises ValueError naming the bad argument. One module per
kind of picture (curves, ranked, masks); their public names are all here.
"""

from ._common import DPI, THUMB
from .curves import plot_cmc, plot_loss_curves, read_jsonl
from .masks import _channel_grid as _channel_grid  # the tests check the grid layout
from .masks import plot_mask_heatmaps
from .ranked import _MATCH as _MATCH, _WRONG as _WRONG  # the tests check the frame colours
from .ranked import plot_ranked_lists, query_average_precision

__all__ = [
    "DPI",
    "THUMB",
    "plot_cmc",
    "plot_loss_curves",
    "plot_mask_heatmaps",
    "plot_ranked_lists",
    "query_average_precision",
    "read_jsonl",
]
