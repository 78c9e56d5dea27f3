"""Models of dpm_ops: DPM, its ViT baseline, MaskReID and MaskReID's ResNet-50 variant.

from dpm_ops.models import build_model, load_pretrained
model = build_model("dpm", num_classes=702, num_cameras=8)          # Occluded-Duke
load_pretrained(model, "jx_vit_base_p16_224-80ecf9dd.pth")
"""

from .dpm import DPM, DPMEvalOutput, DPMLossInputs, DPMParamGroups, DPMTrainOutput, HierarchicalMaskGenerator
from .factory import MODEL_NAMES, MODELS, build_model, construct_model, model_option_defaults
from .maskreid import MaskReID, MaskReIDTrainOutput, SkippedFusionHead
from .resnet import MaskReIDResNet50, ResNet50
from .vit import ViTReID
from .vit_baseline import ViTBaseline, ViTBaselineTrainOutput
from .weights import LoadReport, WeightsError, load_pretrained, resize_pos_embed

__all__ = [
    "DPM",
    "DPMEvalOutput",
    "DPMLossInputs",
    "DPMParamGroups",
    "DPMTrainOutput",
    "HierarchicalMaskGenerator",
    "LoadReport",
    "MODELS",
    "MODEL_NAMES",
    "MaskReID",
    "MaskReIDResNet50",
    "MaskReIDTrainOutput",
    "ResNet50",
    "SkippedFusionHead",
    "ViTBaseline",
    "ViTBaselineTrainOutput",
    "ViTReID",
    "WeightsError",
    "build_model",
    "construct_model",
    "model_option_defaults",
    "load_pretrained",
    "resize_pos_embed",
]
