"""The ``dpm-reid`` command (also ``python -m dpm_ops``).

    dpm-reid train --config synthetic_dpm [--output DIR] [--resume] [key=value ...]
    dpm-reid eval  --config synthetic_dpm --weights runs/synthetic_dpm/checkpoints/final.pt
    dpm-reid synth --out DIR [--ids N ...]
    dpm-reid configs

``--config`` takes a YAML file or a built-in name (``dpm-reid configs`` lists them). Multi-GPU:
``torchrun --nproc_per_node N -m dpm_ops train --config ...``. Bad input (a missing dataset folder,
a wrong layout, an unreadable image, another model's checkpoint, an unknown config key) ends with
one ``dpm-reid: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpm-reid", description="Occluded / mask-based person re-ID: "
                                     "train and evaluate DPM, its ViT baseline and MaskReID.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,synth,configs}")

    train = sub.add_parser("train", help="train (or resume), then evaluate and print the metrics table")
    train.add_argument("--config", required=True, help="YAML file or built-in config name")
    train.add_argument("--output", help="run folder (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints/last.pt")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.epochs=5")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the config's dataset")
    ev.add_argument("--config", required=True, help="YAML file or built-in config name")
    ev.add_argument("--weights", required=True, help="a checkpoint written by `dpm-reid train` (final.pt, last.pt)")
    ev.add_argument("--output", help="folder for metrics.json and pictures (default: next to the weights)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.rerank=true")

    sub.add_parser("synth", help="generate the synthetic occluded re-ID dataset (see `dpm-reid synth -h`)",
                   add_help=False)
    sub.add_parser("configs", help="list the built-in configs")
    return parser


def _default_output(config_arg: str) -> Path:
    return Path("runs") / Path(config_arg).stem


def _train(args) -> int:
    from dpm_ops.engine import load_config, train
    from dpm_ops.engine.checkpoint import make_output_folder

    config = load_config(args.config, args.overrides)
    output = make_output_folder(args.output or _default_output(args.config), "--output")
    result = train(config, output, resume=args.resume)
    if result["finished"] and result["metrics"] is not None:
        print(f"run folder: {output}")
    return 0


def _eval(args) -> int:
    import torch

    from dpm_ops.engine import load_checkpoint, load_config
    from dpm_ops.engine import distributed
    from dpm_ops.engine.checkpoint import load_model_state, make_output_folder
    from dpm_ops.engine.trainer import (build_model_from_args, check_model_fits_data, eval_model_arguments,
                                        evaluate_with_config, load_splits, prepare_synthetic, resolve_device)

    config = load_config(args.config, args.overrides)
    state = load_checkpoint(args.weights, model_name=config["model"]["name"])
    output = make_output_folder(args.output or Path(args.weights).resolve().parent.parent / "eval", "--output")
    device = resolve_device(config["train"]["device"])
    info = distributed.init_distributed(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    prepare_synthetic(config, progress=config["train"]["progress"] and info.is_main)
    splits = load_splits(config)
    check_model_fits_data(state["model_args"], config, splits, f"checkpoint {args.weights}")
    model = build_model_from_args(state["model_name"],
                                  eval_model_arguments(state["model_name"], state["model_args"], config))
    load_model_state(model, state["model"], args.weights)
    model.to(device).eval()
    evaluate_with_config(model, splits, config, device=device, out_dir=output,
                         progress=config["train"]["progress"] and info.is_main)
    if info.is_main:
        print(f"metrics written to {output / 'metrics.json'}")
    return 0


def _one_line(error: BaseException) -> str:
    """The message on one line; an error re-raised from a DataLoader worker carries the worker's
    traceback in its message, whose last line is the original ``module.Class: message``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "." in head and " " not in head else last


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth":
        from dpm_ops.data.synth import main as synth_main

        return synth_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "configs":
        from dpm_ops.engine.config import CONFIG_DIR, available_configs

        for name in available_configs():
            print(f"{name:<32} {CONFIG_DIR / (name + '.yaml')}")
        return 0

    from dpm_ops.data import DatasetError
    from dpm_ops.engine import CheckpointError, ConfigError
    from dpm_ops.engine import distributed

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return _train(args) if args.command == "train" else _eval(args)
    except (ConfigError, CheckpointError, DatasetError) as error:
        print(f"dpm-reid: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dpm-reid: interrupted (resume with --resume)", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
