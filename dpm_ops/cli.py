"""The ``dpm-reid`` command (also ``python -m dpm_ops``).

    dpm-reid train --config synthetic_dpm [--output DIR] [--resume | --auto-resume | --overwrite] [key=value ...]
    dpm-reid eval  --config synthetic_dpm --weights runs/synthetic_dpm/checkpoints/final.pt [--splits 0-9]
    dpm-reid export --config synthetic_dpm --weights CKPT --out model.onnx [--batch N] [--opset N]
    dpm-reid extract --config synthetic_dpm --weights CKPT --images DIR --out features.npz [--camera N]
    dpm-reid rank --query query.npz --gallery gallery.npz [--aqe] [--rerank [kreciprocal|gnn]] [--roc] [--out F]
    dpm-reid summary runs/viper_split0 runs/viper_split1 ... [--out summary.json]
    dpm-reid synth --out DIR [--ids N ...]
    dpm-reid configs
    dpm-reid --version

``--config`` takes a YAML file or a built-in name (``dpm-reid configs`` lists them). Multi-GPU:
``torchrun --nproc_per_node N -m dpm_ops train --config ...``. Bad input (a missing dataset folder,
a wrong layout, an unreadable image, another model's checkpoint, an unknown config key, an --out
that cannot be written) ends with one ``dpm-reid: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .cli_rank import add_rank_parser, rank

EXIT_USAGE = 2
MAX_SPLITS = 100  # --splits: torchreid's sets have 10 or 20
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell or scheduler reports for a process SIGTERM ended


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, ``<prefix>: error: <message> (see <prog> --help)``, exit 2:
    its usage block buried the message. ``prefix`` is the program the line names (default: prog)."""

    prefix: Optional[str] = None

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prefix or self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(OneLineParser):
    prefix = "dpm-reid"  # a command's mistakes read as the rest of dpm-reid's errors


def path_argument(text: str) -> str:
    """A path given on the command line: not empty (Path('') is the current folder: an empty --images
    searched it, an empty --output took the default) and encodable as UTF-8 (the logs write it; a run
    with an undecodable byte in --output failed after training)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"expected a UTF-8 path, got {text!r}") from None
    return text


def split_list(text: str) -> list[int]:
    """``--splits``: split ids and ranges, ``0-9`` or ``0,2,5`` or ``0-3,7`` (at most MAX_SPLITS)."""
    ids = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isascii() and first.isdigit() and (not dash or last.isascii() and last.isdigit())):
            raise argparse.ArgumentTypeError(f"expected split ids and ranges such as 0-9 or 0,2,5, got {text!r}")
        stop = int(last) if dash else int(first)
        if stop < int(first) or len(ids) + stop - int(first) >= MAX_SPLITS:
            raise argparse.ArgumentTypeError(f"expected increasing ranges of at most {MAX_SPLITS} splits, got {text!r}")
        ids += range(int(first), stop + 1)
    return ids


class _VersionAction(argparse.Action):
    """--version, computed when asked: it imports torch, which every other parse would wait for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of dpm_ops, torch and the backends")

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --weights of a command that rebuilds a trained model (export, extract)."""
    parser.add_argument(
        "--config",
        required=True,
        type=path_argument,
        help="YAML file or built-in config name (the one it was trained with)",
    )
    parser.add_argument(
        "--weights",
        required=True,
        type=path_argument,
        help="a checkpoint of `dpm-reid train`, or a state dict of the config's model",
    )


def _version() -> str:
    """What a bug report needs: the library's, torch's and the usable backends' versions."""
    import torch

    import dpm_ops

    usable = [name for name, (available, _) in dpm_ops.backends().items() if available]
    return f"dpm-reid {dpm_ops.__version__} (torch {torch.__version__}; backends: {', '.join(usable)})"


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint on the config's dataset")
    ev.add_argument("--config", required=True, type=path_argument, help="YAML file or built-in config name")
    ev.add_argument(
        "--weights",
        required=True,
        type=path_argument,
        help="a checkpoint of `dpm-reid train` (final.pt, last.pt), or a state dict of the config's model "
        "(torch.save(model.state_dict()), the official DPM release)",
    )
    ev.add_argument(
        "--output",
        type=path_argument,
        help="folder for metrics.json and pictures (default: <run>/eval for <run>/checkpoints/*.pt, else eval/ "
        "beside the weights)",
    )
    ev.add_argument(
        "--splits",
        type=split_list,
        help="evaluate these splits of the test sets (dataset.split_id), e.g. 0-9 or 0,2,5: each into "
        "<output>/split_<id>, then their mean and std (summary.json)",
    )
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.rerank=true")


def _add_summary_parser(sub) -> None:
    sm = sub.add_parser("summary", help="mean and std of the metrics of several runs (a dataset's splits, a run each)")
    sm.add_argument("runs", nargs="+", type=path_argument, help="run folders, evaluation folders or metrics.json files")
    sm.add_argument("--out", type=path_argument, help="also write the summary to this .json file")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dpm-reid",
        description="Occluded / mask-based person re-ID: train and evaluate DPM, its ViT baseline and MaskReID.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{train,eval,export,extract,rank,summary,synth,configs}",
        parser_class=_CommandParser,
    )
    parser.commands = sub.choices  # name -> its parser, whose error names its own --help

    train = sub.add_parser("train", help="train (or resume), then evaluate and print the metrics table")
    train.add_argument("--config", required=True, type=path_argument, help="YAML file or built-in config name")
    train.add_argument("--output", type=path_argument, help="run folder (default: runs/<config name>)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints/last.pt")
    start.add_argument("--auto-resume", action="store_true", help="--resume where there is a last.pt, else start")
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output that holds a run (its checkpoints and results go)",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.epochs=5")

    _add_eval_parser(sub)

    ex = sub.add_parser("export", help="export a checkpoint's test-time model to ONNX, checked by onnxruntime")
    _add_checkpoint_arguments(ex)
    ex.add_argument("--out", required=True, type=path_argument, help="the .onnx file to write")
    ex.add_argument(
        "--batch",
        type=int,
        default=2,
        help="example batch the graph is traced with (2..256; the batch axis stays dynamic; "
        "the check runs at N and N+1, at 255 and 256 for N=256)",
    )
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset, 18..23 (default 18)")
    ex.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    ex.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    fx = sub.add_parser("extract", help="features (and DPM masks) of every image under a folder, to an .npz")
    _add_checkpoint_arguments(fx)
    fx.add_argument("--images", required=True, type=path_argument, help="folder of images (searched recursively)")
    fx.add_argument("--out", required=True, type=path_argument, help="the .npz file to write")
    fx.add_argument(
        "--camera",
        type=int,
        default=None,
        help="0-based camera id of every image (models with a "
        "camera embedding; default: from Market-style names <pid>_c<camera>...)",
    )
    fx.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=64")

    add_rank_parser(sub)
    _add_summary_parser(sub)

    sub.add_parser(
        "synth", help="generate the synthetic occluded re-ID dataset (see `dpm-reid synth -h`)", add_help=False
    )
    sub.add_parser("configs", help="list the built-in configs")
    return parser


def _default_output(config_arg: str) -> Path:
    return Path("runs") / Path(config_arg).stem


def _resume_hint(args) -> str:
    """After a training's Ctrl-C: how to go on, where a checkpoint was written (not while the data was prepared)."""
    output = Path(os.path.expanduser(args.output or _default_output(args.config))) if args.command == "train" else None
    return " (resume with --resume)" if output is not None and (output / "checkpoints" / "last.pt").is_file() else ""


def _train(args) -> int:
    from dpm_ops.engine import load_config, make_output_folder, train
    from dpm_ops.engine.preemption import PreemptionHook

    config = load_config(args.config, args.overrides)
    output = make_output_folder(args.output or _default_output(args.config), "--output")
    resume = "auto" if args.auto_resume else args.resume
    result = train(config, output, resume=resume, overwrite=args.overwrite)
    if result["finished"] and result["metrics"] is not None:
        print(f"run folder: {output}")
    if (result["stop_reason"] or "").startswith(PreemptionHook.REASON):  # every rank
        print(f"dpm-reid: {result['stop_reason']} (resume with --resume)", file=sys.stderr)
        return EXIT_TERMINATED
    return 0


def _eval(args) -> int:
    from dpm_ops.engine import evaluate_checkpoint, load_config

    config = load_config(args.config, args.overrides)
    metrics, output = evaluate_checkpoint(config, args.weights, args.output, split_ids=args.splits)
    if metrics is not None and args.splits:  # rank 0
        from dpm_ops.engine.summary import format_summary

        print(format_summary(metrics))
        print(
            f"splits' metrics written to {output}/split_<id>/metrics.json, their summary to {output / 'summary.json'}"
        )
    elif metrics is not None:
        print(f"metrics written to {output / 'metrics.json'}")
    return 0


def _checkpoint_model(args):
    """(config, the checkpoint's model in eval mode on the CPU), as `dpm-reid eval` builds it."""
    from dpm_ops.engine import checkpoint_model, load_config

    config = load_config(args.config, args.overrides)
    return config, checkpoint_model(config, args.weights)


def _export(args) -> int:
    from dpm_ops.engine import resolve_device
    from dpm_ops.export import (
        DEFAULT_OPSET,
        MAX_EXAMPLE_BATCH,
        ExportError,
        check_export_modules,
        check_int,
        check_opset,
        check_output_path,
        export_onnx,
    )

    # export_onnx's own checks, named as the flags and before the checkpoint is read
    check_int("--batch", args.batch, 2, MAX_EXAMPLE_BATCH)
    if args.opset is not None:
        check_opset("--opset", args.opset)
    check_output_path(args.out, "--out", ".onnx", _inputs(args, "config", "weights"))
    try:
        check_export_modules(not args.no_check, "the check of the exported file (--no-check leaves it out)")
    except ImportError as error:
        raise ExportError(str(error)) from error
    resolve_device("cpu")  # exported (and checked) on the CPU: a DPM_OPS_BACKEND that cannot run there is named now
    config, model = _checkpoint_model(args)  # the graph does not depend on the device
    if config["eval"]["flip"]:  # taken and left out of the graph: its features differed from extract's
        raise ExportError(
            "eval.flip: the ONNX graph is the plain eval forward, without flip test-time augmentation; leave it off "
            "(and average the features of the mirrored images yourself for it)"
        )
    result = export_onnx(
        model,
        args.out,
        image_size=tuple(config["input"]["size"]),
        batch=args.batch,
        opset=DEFAULT_OPSET if args.opset is None else args.opset,
        check=not args.no_check,
    )
    print(
        f"wrote {result.path} (opset {result.opset}): inputs {', '.join(result.input_names)} -> outputs "
        f"{', '.join(result.output_names)}, batch axis dynamic, images {result.image_size[0]}x{result.image_size[1]}"
    )
    if result.max_relative_error is not None:
        errors = ", ".join(f"{name} {error:.1e}" for name, error in result.max_relative_error.items())
        print(
            f"onnxruntime matches PyTorch at batch {' and '.join(map(str, result.checked_batches))}: "
            f"max relative error {errors}"
        )
    return 0


def _extract(args) -> int:
    from dpm_ops.engine import resolve_amp, resolve_device
    from dpm_ops.export import check_int, check_output_path
    from dpm_ops.feature_files import extract_folder, save_features_npz

    if args.camera is not None:  # extract_folder's own check, named as the flag and before the checkpoint is read
        check_int("--camera", args.camera, 0)
    out = check_output_path(args.out, "--out", ".npz", _inputs(args, "config", "weights"))
    config, model = _checkpoint_model(args)
    device = resolve_device(config["train"]["device"])
    ev = config["eval"]
    features = extract_folder(
        model.to(device),
        args.images,
        image_size=tuple(config["input"]["size"]),
        camid=args.camera,
        batch_size=ev["batch_size"],
        num_workers=ev["num_workers"],
        device=device,
        amp_dtype=resolve_amp(ev["amp"], device),
        flip=ev["flip"],
        progress=config["train"]["progress"],
    )
    save_features_npz(out, features, model)
    masks = ", masks" if features.masks is not None else ""
    print(f"wrote {out}: {len(features)} images, features {tuple(features.features.shape)}{masks}")
    return 0


def _summary(args) -> int:
    from dpm_ops.engine.evaluator import write_json_atomic
    from dpm_ops.engine.summary import format_summary, summarize_runs
    from dpm_ops.export import check_output_path

    read = {f"run {run}": Path(run, "metrics.json") if Path(run).is_dir() else run for run in args.runs}
    out = None if args.out is None else check_output_path(args.out, "--out", ".json", read)
    if out is not None and out.name == "metrics.json":  # read as a run's metrics by eval, summary and the trainer
        raise ValueError(f"--out {out}: a summary is not a metrics.json; give it another name")
    summary = summarize_runs(args.runs)
    print(format_summary(summary))
    if out is not None:
        write_json_atomic(out, summary)
        print(f"summary written to {out}")
    return 0


def _inputs(args, *names: str) -> dict:
    """The files the command reads, by flag: an --out that is one of them is refused."""
    return {f"--{name}": getattr(args, name) for name in names}


def _one_line(error: BaseException) -> str:
    """The message on one line; an error re-raised from a DataLoader worker carries the worker's
    traceback in its message, whose last line is the original ``module.Class: message``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "." in head and " " not in head else last


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, like the errors: not Python's file, line number and source line beneath."""
    return f"dpm-reid: warning: {message}\n"


def _os_error(error: OSError, args) -> str:
    """An OSError's line, naming the path argument it concerns (a file of a run folder: its --output)."""
    filename = str(error.filename or "")
    for name in ("output", "out", "images", "query", "gallery", "weights", "config"):
        value = getattr(args, name, None)
        if value and filename.startswith(os.path.expanduser(value)):
            return f"--{name} {value}: {error.strerror or error} ({filename})"
    return _one_line(error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs a command; Ctrl-C (also while torch imports) ends it with one line, exit 130."""
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, not at exit: a reader that left (`| head`) raises BrokenPipeError below
        return code
    except KeyboardInterrupt:
        print("dpm-reid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `dpm-reid configs | head`: the reader left; nothing is left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1


def _main(argv: list) -> int:
    if argv and argv[0] == "synth":
        from dpm_ops.data.synth import main as synth_main

        return synth_main(argv[1:])
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's options are what was mistyped: its help lists them
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "configs":
        from dpm_ops.engine.config import CONFIG_DIR, available_configs

        for name in available_configs():
            print(f"{name:<32} {CONFIG_DIR / (name + '.yaml')}")
        return 0

    import torch.distributed

    from dpm_ops.engine import distributed
    from dpm_ops.engine.checkpoint import first_line
    from dpm_ops.export import OnnxCheckError

    commands = {
        "train": _train,
        "eval": _eval,
        "export": _export,
        "extract": _extract,
        "rank": rank,
        "summary": _summary,
    }
    formatwarning = warnings.formatwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = _one_line_warning
            return commands[args.command](args)
    except OnnxCheckError as error:  # not the user's input: the exported graph computes something else
        print(f"dpm-reid: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except ValueError as error:  # ConfigError, CheckpointError, DatasetError, ExportError, the library's other checks
        # Under torchrun every rank that finds a mistake says it (the same line from each, for a config mistake):
        # a rank that stayed silent could exit first, and torchrun then stopped rank 0 before it printed anything.
        print(f"dpm-reid: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except torch.distributed.DistError as error:  # gloo / NCCL's error when another rank left (its line says why)
        print(
            f"dpm-reid: error: rank {os.environ.get('RANK', '0')}: the run's process group failed, another process "
            f"of the run ended first ({first_line(error)})",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:  # `dpm-reid rank ... | head -1`: main's quiet exit, not a failed write
        raise
    except OSError as error:  # a write that failed mid-run: a full disk, a folder where a file goes
        print(f"dpm-reid: error: {_os_error(error, args)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dpm-reid: interrupted{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = formatwarning
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
