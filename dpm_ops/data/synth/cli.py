"""``dpm-reid synth``: the command line of the generator."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from ..datasets import read_synthetic_manifest
from ..errors import DatasetError
from .config import SynthConfig, SynthOptionError
from .writing import generate_synthetic_dataset


def _int_range(text: str) -> tuple[int, int]:
    """"N" or "LOW,HIGH"; the values are SynthConfig's to check."""
    low, _, high = text.partition(",")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW,HIGH, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(
        prog="dpm-reid synth",
        description="Generate the synthetic occluded re-ID dataset (Market-1501 layout + masks + synthetic.json).",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (created; must be empty or a synthetic set with --force)"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed; same seed, same bytes (default %(default)s)"
    )
    parser.add_argument(
        "--ids", type=int, default=defaults.ids, help="identities in all, half train / half test (default %(default)s)"
    )
    parser.add_argument(
        "--cameras", type=int, default=defaults.cameras, help="number of cameras, 2-9 (default %(default)s)"
    )
    parser.add_argument("--width", type=int, default=defaults.width, help="image width (default %(default)s)")
    parser.add_argument("--height", type=int, default=defaults.height, help="image height (default %(default)s)")
    parser.add_argument(
        "--train-images",
        type=_int_range,
        default="{},{}".format(*defaults.train_images),
        metavar="LOW,HIGH",
        help="images per train identity (default %(default)s)",
    )
    parser.add_argument(
        "--gallery-per-camera",
        type=_int_range,
        default="{},{}".format(*defaults.gallery_per_camera),
        metavar="LOW,HIGH",
        help="gallery images per test identity and camera (default %(default)s)",
    )
    parser.add_argument(
        "--queries-per-id",
        type=int,
        default=defaults.queries_per_id,
        help="queries per test identity (default %(default)s)",
    )
    parser.add_argument(
        "--distractors",
        type=float,
        default=defaults.distractors,
        help="pid 0 gallery images, as a share of the identities' gallery images (default %(default)s)",
    )
    parser.add_argument(
        "--junk",
        type=float,
        default=defaults.junk,
        help="pid -1 (junk) gallery images, same unit (default %(default)s)",
    )
    parser.add_argument(
        "--query-occlusion",
        type=float,
        default=defaults.query_occlusion,
        help="share of occluded queries (default %(default)s)",
    )
    parser.add_argument(
        "--gallery-occlusion",
        type=float,
        default=defaults.gallery_occlusion,
        help="share of occluded gallery images (default %(default)s)",
    )
    parser.add_argument(
        "--train-occlusion",
        type=float,
        default=defaults.train_occlusion,
        help="share of occluded train images (default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing synthetic dataset in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = SynthConfig(
            seed=args.seed,
            ids=args.ids,
            cameras=args.cameras,
            width=args.width,
            height=args.height,
            train_images=args.train_images,
            gallery_per_camera=args.gallery_per_camera,
            queries_per_id=args.queries_per_id,
            distractors=args.distractors,
            junk=args.junk,
            query_occlusion=args.query_occlusion,
            gallery_occlusion=args.gallery_occlusion,
            train_occlusion=args.train_occlusion,
            id_cameras=(2, min(SynthConfig.id_cameras[1], args.cameras)),
        )
        start = time.perf_counter()
        out = generate_synthetic_dataset(args.out, config, progress=not args.quiet, force=args.force)
    except SynthOptionError as error:
        print(f"dpm-reid synth: error: --{error.option.replace('_', '-')}: {error.problem}", file=sys.stderr)
        return 2
    except DatasetError as error:  # an unusable --out
        print(f"dpm-reid synth: error: --out: {error}", file=sys.stderr)
        return 2
    manifest = read_synthetic_manifest(str(out))
    counts = manifest["counts"]
    occluded_queries = sum(name.startswith("query/") for name in manifest["occlusion"])
    print(
        f"wrote {out} in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{split} {ids} ids / {images} images" for split, (ids, images) in counts.items())
        + f"; {occluded_queries} of {counts['query'][1]} queries occluded"
    )
    return 0
