"""``dpm-reid synth``: the command line of the generator."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Optional, Sequence, get_type_hints

from ..errors import DatasetError
from ..parsing import read_synthetic_manifest
from .config import SynthConfig, SynthOptionError, synth_config
from .writing import generate_synthetic_dataset


def _int_range(text: str) -> tuple[int, int]:
    """ "N" or "LOW,HIGH"; the values are SynthConfig's to check."""
    low, comma, high = text.partition(",")
    try:
        return int(low), int(high if comma else low)  # "3," is no range: int("") refuses it
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW,HIGH, got {text!r}") from None


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _option_fields() -> list[dataclasses.Field]:
    """The SynthConfig fields that are command-line options, in declaration order."""
    return [field for field in dataclasses.fields(SynthConfig) if "help" in field.metadata]


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field, field_type) -> None:
    """``--<field-name>`` with the field's default and help; a pair of ints is typed as LOW,HIGH."""
    flag, help_text = _flag(field.name), field.metadata["help"] + " (default %(default)s)"
    if field_type == tuple[int, int]:
        # a string default goes through the type like a typed value, and reads as typed in -h
        parser.add_argument(
            flag, type=_int_range, default="{},{}".format(*field.default), metavar="LOW,HIGH", help=help_text
        )
    elif field_type in (int, float):
        parser.add_argument(flag, type=field_type, default=field.default, help=help_text)
    else:
        raise TypeError(f"SynthConfig.{field.name}: no command-line form for {field_type}")


def build_parser() -> argparse.ArgumentParser:
    from dpm_ops.cli import OneLineParser

    parser = OneLineParser(
        prog="dpm-reid synth",
        description="Generate the synthetic occluded re-ID dataset (Market-1501 layout + masks + synthetic.json).",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (created; must be empty or a synthetic set with --force)",
    )
    field_types = get_type_hints(SynthConfig)
    for field in _option_fields():
        _add_option(parser, field, field_types[field.name])
    parser.add_argument("--force", action="store_true", help="replace an existing synthetic dataset in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    options = {field.name: getattr(args, field.name) for field in _option_fields()}
    try:
        config = synth_config(options)
        start = time.perf_counter()
        out = generate_synthetic_dataset(args.out, config, progress=not args.quiet, force=args.force)
    except SynthOptionError as error:
        print(f"dpm-reid synth: error: {_flag(error.option)}: {error.problem}", file=sys.stderr)
        return 2
    except DatasetError as error:  # an unusable --out
        print(f"dpm-reid synth: error: --out: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the system refuses (a name too long), a full disk
        where = f": {error.filename}" if error.filename else ""
        print(f"dpm-reid synth: error: --out: {error.strerror or error}{where}", file=sys.stderr)
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
