"""A synthetic occluded person re-ID dataset, drawn procedurally with Pillow.

The set is written in Market-1501 layout (``bounding_box_train``, ``query``, ``bounding_box_test``
with names like ``0001_c1s1_000151_00.jpg``) plus a MaskReID mask tree (``<folder>_seg/*.png``,
see :mod:`dpm_ops.data.masks`) and a manifest ``synthetic.json`` (config, split counts, and for every occluded
image the occluder kind and the fraction of the body it hides).

Design, so that occlusion matters:

* identity evidence is spread over the whole body: hair/hat, top colour + texture (stripes,
  checks, dots, two-tone, logo), sleeves, bottom type + colour, shoes and bag each carry part of it,
  so an occluder that hides the legs or the torso removes real evidence;
* nuisance factors vary per camera (background, colour cast, brightness, blur, person scale) and
  per image (view front/back, pose, position, noise), so colour alone does not match exactly;
* occluders (crates/cars/bushes from the ground, pillars and walls from the side, poles, boards,
  other pedestrians in front) hide 25-60% of the body in most queries and some gallery/train
  images; the mask marks only the target's visible pixels (occluders, including people, excluded).

Everything is a function of the seed: each image has its own random stream keyed by
(seed, job number), so the same seed gives byte-identical files.

The package: :mod:`.config` (the options), :mod:`.drawing` (a person), :mod:`.scene` (occluders,
cameras), :mod:`.planning` (which images), :mod:`.writing` (rendering and writing the set) and
:mod:`.cli` (``dpm-reid synth``).
"""

from .cli import build_parser, main
from .config import SynthConfig, SynthOptionError, synth_config
from .drawing import HAIR_COLOURS, SKIN_TONES, Appearance, Pose, draw_person, random_appearance, random_pose
from .scene import OCCLUDER_KINDS, Camera, draw_occluder
from .writing import MANIFEST_FORMAT, check_synthetic_dataset, ensure_synthetic_dataset, generate_synthetic_dataset

__all__ = [
    "HAIR_COLOURS",
    "MANIFEST_FORMAT",
    "OCCLUDER_KINDS",
    "SKIN_TONES",
    "Appearance",
    "Camera",
    "Pose",
    "SynthConfig",
    "SynthOptionError",
    "build_parser",
    "check_synthetic_dataset",
    "draw_occluder",
    "draw_person",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "main",
    "random_appearance",
    "random_pose",
    "synth_config",
]
