"""torchreid's `torchreid.reid.metrics.evaluate_rank` and `compute_distance_matrix`,
`torchreid.reid.utils.re_ranking` and `FeatureExtractor` (0.2.5), computed by dpm_ops:
`from dpm_ops.compat.torchreid import evaluate_rank, re_ranking, compute_distance_matrix, FeatureExtractor`."""

import numbers
from collections.abc import Mapping

import numpy as np
import torch

from . import _peer
from ._peer import cosine_distance, euclidean_squared_distance, re_ranking

__all__ = [
    "FeatureExtractor",
    "compute_distance_matrix",
    "cosine_distance",
    "euclidean_squared_distance",
    "evaluate_rank",
    "re_ranking",
]


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False, use_cython=True):
    """(cmc, mAP): cmc float32 (min(max_rank, G),), mAP a numpy float64, as torchreid returns them.

    use_metric_cuhk03=True: CUHK03 single-gallery-shot CMC over 10 seeded draws. use_cython is
    accepted and ignored (there is one implementation).
    """
    cmc, result = _peer.rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03)
    return cmc, np.float64(result.mAP)


def compute_distance_matrix(input1, input2, metric="euclidean"):
    """(M, N) distances of two 2-D feature matrices, for torch input a torch tensor on their device as
    torchreid's (numpy arrays or lists, which theirs does not take, come back as numpy):
    "euclidean" is the *squared* Euclidean distance (torchreid's euclidean_squared_distance, what
    its engine ranks and re-ranks), "cosine" 1 − cos."""
    distances = {"euclidean": euclidean_squared_distance, "cosine": cosine_distance}
    if metric not in tuple(distances):  # a list or other unhashable value: this ValueError, not a TypeError
        raise ValueError(f'Unknown distance metric: {metric}. Please choose either "euclidean" or "cosine"')
    return distances[metric](input1, input2)


class FeatureExtractor:
    """torchreid's ``FeatureExtractor`` for dpm_ops' models: ``FeatureExtractor(model_name=CONFIG,
    model_path=WEIGHTS, device="cuda")``, with a built-in config name or YAML file and what
    ``dpm-reid eval --weights`` takes (a checkpoint, a state dict, the official DPM release).

    Called as torchreid's is, on image paths or (H, W, 3) uint8 RGB arrays (one, or a list; PIL images
    too), or on a preprocessed (B, 3, H, W) / (3, H, W) tensor, it returns the (B, D) features of the
    model's eval forward on ``device``, not L2-normalised (as torchreid's). Images get the model's own
    test transforms at ``image_size`` (default: the config's ``input.size``), so ``pixel_mean``,
    ``pixel_std`` and ``pixel_norm`` stay unset. Models with a camera embedding (DPM, the ViT
    baseline) take ``camids=`` in the call (one int, or one per image), MaskReID ``masks=`` (one per
    image; with a tensor, a (B, 1, H, W) {0, 1} tensor). DPM's channel masks, which its masked
    distance needs, come with the features from :func:`dpm_ops.feature_files.extract_images`.
    """

    def __init__(
        self,
        model_name="",
        model_path="",
        image_size=None,
        pixel_mean=None,
        pixel_std=None,
        pixel_norm=None,
        device="cuda",
        verbose=True,
    ):
        from dpm_ops.engine import get_recipe, load_config
        from dpm_ops.engine.builders import checkpoint_model, resolve_device
        from dpm_ops.engine.extraction import _check_image_size
        from dpm_ops.export import model_input_size, model_kind

        for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std), ("pixel_norm", pixel_norm)):
            if value is not None:
                raise ValueError(f"{name}: dpm_ops models normalise images as their test transforms do; leave it unset")
        # torchreid's defaults ("") build an ImageNet-initialised model; a re-ID model here needs both.
        if not model_name:
            raise ValueError("model_name: name a config, built-in (dpm-reid configs lists them) or a YAML file")
        if not model_path:
            raise ValueError(
                "model_path: name the trained weights (a checkpoint, a state dict, the official DPM release); "
                "unlike torchreid, dpm_ops has no ImageNet-initialised model to fall back on"
            )
        device = resolve_device(device, "device")
        config = load_config(model_name)
        self.model = checkpoint_model(config, model_path).to(device)
        self.kind = model_kind(self.model)
        self.recipe = get_recipe(self.kind)
        # torchreid's image_size is (height, width) or one int for both
        if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
            image_size = (int(image_size), int(image_size))
        # checked here, not at the first call: (height, width) positive ints, the ViTs' own input size
        size = _check_image_size(image_size) if image_size is not None else tuple(config["input"]["size"])
        self.image_size = model_input_size(self.model, self.kind, size)
        self.device = device
        if verbose:
            print(f"Model: {self.kind} ({model_name}, weights {model_path})")
            print(f"- params: {sum(p.numel() for p in self.model.parameters()):,}")

    def __call__(self, input, camids=None, masks=None) -> torch.Tensor:
        from dpm_ops.data import masked_image
        from dpm_ops.feature_files import extract_images, image_cameras

        if isinstance(input, Mapping):  # its keys would be read as images
            raise ValueError(
                "input must be an image path, a PIL image, an (H, W, 3) uint8 array, a list of them, "
                f"or a (B, 3, H, W) / (3, H, W) tensor, got {type(input).__name__}"
            )
        if not isinstance(input, torch.Tensor):
            found = extract_images(
                self.model,
                input,
                camids=camids,
                masks=masks,
                image_size=self.image_size,
                device=self.device,
                normalize=False,
            )
            return found.features.to(self.device)
        images = input.unsqueeze(0) if input.dim() == 3 else input
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"input: a tensor must be (B, 3, H, W) or (3, H, W), got {tuple(input.shape)}")
        if images.shape[0] == 0:  # as extract_images refuses no image (its camids would be blamed)
            raise ValueError(f"input: no image given (a tensor of shape {tuple(input.shape)})")
        names = [f"input[{i}]" for i in range(images.shape[0])]
        batch = {"image": images, "camid": torch.tensor(image_cameras(self.model, camids, names))}
        if self.recipe.uses_masks:
            if masks is None:
                raise ValueError(f"masks: {self.kind} needs the (B, 1, H, W) foreground mask of each image")
            batch["masked"] = masked_image(images, _mask_batch(masks, images, input.dim() == 3))
        with torch.inference_mode():
            return self.recipe.test_forward(self.model, batch, self.device)[0].float()


def _mask_batch(masks, images: torch.Tensor, one_image: bool) -> torch.Tensor:
    """``masks`` for a tensor input: a (B, 1, H, W) (or, for one (3, H, W) image, (1, H, W)) tensor or array of 0 / 1
    values, as the images' dtype on their device (0 / 255 masks multiplied the images by 255, silently)."""
    expected = (1, *images.shape[2:]) if one_image else (images.shape[0], 1, *images.shape[2:])
    if not isinstance(masks, (torch.Tensor, np.ndarray)):
        raise ValueError(f"masks: with a tensor input, a {expected} tensor of 0 / 1 values, got {type(masks).__name__}")
    masks = torch.as_tensor(masks)
    if tuple(masks.shape) != expected:
        raise ValueError(
            f"masks: expected a {expected} tensor (one (1, H, W) mask per image), got {tuple(masks.shape)}"
        )
    if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
        raise ValueError("masks: values must be 0 (background) or 1 (foreground), e.g. a bool tensor")
    return masks.reshape(images.shape[0], 1, *images.shape[2:]).to(device=images.device, dtype=images.dtype)
