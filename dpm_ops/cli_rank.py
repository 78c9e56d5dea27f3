"""The ``dpm-reid rank`` command: CMC / mAP / mINP of the features ``dpm-reid extract`` wrote, a query .npz ranked
against a gallery .npz (with alpha query expansion, re-ranking, fast-reid's ROC report)."""

from __future__ import annotations

RERANK_METHODS = ("kreciprocal", "gnn")  # dpm_ops.evaluation.RERANK_METHODS (tested), without importing torch
DISTANCES = ("auto", "euclidean", "cosine", "masked_arccos")  # dpm_ops.engine.scoring.DISTANCES (tested)
AQE_DEFAULTS = {"k": 5, "alpha": 3.0, "times": 1}  # dpm_ops.evaluation.query_expansion.AQE_DEFAULTS (tested)


def add_rank_parser(sub) -> None:
    """The rank command's arguments."""
    from dpm_ops.cli import path_argument  # the CLI's, imported when it builds its parser

    rk = sub.add_parser("rank", help="CMC / mAP / mINP of a gallery .npz ranked for a query .npz (of extract)")
    rk.add_argument("--query", required=True, type=path_argument, help="the queries' .npz (dpm-reid extract)")
    rk.add_argument("--gallery", required=True, type=path_argument, help="the gallery's .npz, from the same model")
    rk.add_argument(
        "--distance",
        default="auto",
        choices=DISTANCES,  # checked before the .npz files are read
        help="auto (the model's test distance: DPM's masked arccos, else euclidean), euclidean, cosine, masked_arccos",
    )
    rk.add_argument(
        "--rerank",
        nargs="?",
        const="kreciprocal",
        choices=RERANK_METHODS,
        help="re-rank: kreciprocal (Zhong et al., CVPR 2017; the default of a bare --rerank) or gnn "
        "(Zhang et al.'s GNN re-ranking)",
    )
    rk.add_argument("--k1", type=int, default=None, help="re-ranking's k1 (default: kreciprocal 20, gnn 26)")
    rk.add_argument("--k2", type=int, default=None, help="re-ranking's k2 (default: kreciprocal 6, gnn 7)")
    rk.add_argument("--lambda-value", type=float, default=None, help="re-ranking's lambda (default 0.3)")
    rk.add_argument(
        "--aqe", action="store_true", help="alpha query expansion of the features first (fast-reid's TEST.AQE)"
    )
    for option, kind, what in (
        ("k", int, "neighbour count"),
        ("alpha", float, "weight exponent"),
        ("times", int, "rounds"),
    ):
        rk.add_argument(
            f"--aqe-{option}", type=kind, default=None, help=f"AQE's {what} (default {AQE_DEFAULTS[option]})"
        )
    rk.add_argument("--roc", action="store_true", help="also the TPR at FPR 1e-4 / 1e-3 / 1e-2 (fast-reid's TEST.ROC)")
    rk.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    rk.add_argument("--out", type=path_argument, help="also write the metrics (and the settings) to this .json file")


def rank(args) -> int:
    """`dpm-reid rank`: the metrics of a query .npz ranked against a gallery .npz (of `dpm-reid extract`)."""
    from dpm_ops.cli import _inputs
    from dpm_ops.engine import resolve_device
    from dpm_ops.engine.checkpoint import run_checkpoints
    from dpm_ops.engine.evaluator import write_json_atomic
    from dpm_ops.engine.scoring import format_metrics_table
    from dpm_ops.export import check_output_path
    from dpm_ops.feature_files import load_features_npz, rank_features

    for flag, options in (("--rerank", ("k1", "k2", "lambda_value")), ("--aqe", ("aqe_k", "aqe_alpha", "aqe_times"))):
        given = [f"--{name.replace('_', '-')}" for name in options if getattr(args, name) is not None]
        if given and not getattr(args, flag[2:]):  # else the run would silently score without them
            raise ValueError(f"{' / '.join(given)} {'is' if len(given) == 1 else 'are'} only used with {flag}")
    inputs = _inputs(args, "query", "gallery")
    out = None if args.out is None else check_output_path(args.out, "--out", ".json", inputs)
    if out is not None and out.name == "metrics.json" and run_checkpoints(out.parent):
        raise ValueError(f"--out {out} is a training run's metrics.json; write to another file")  # as eval refuses
    device = resolve_device(args.device, "--device")
    query, gallery = load_features_npz(args.query, "--query"), load_features_npz(args.gallery, "--gallery")
    lambda_value = 0.3 if args.lambda_value is None else args.lambda_value
    given = {name: getattr(args, f"aqe_{name}") for name in AQE_DEFAULTS}
    aqe = {name: value for name, value in given.items() if value is not None} if args.aqe else False
    rerank = dict(rerank=args.rerank or False, k1=args.k1, k2=args.k2, lambda_value=lambda_value)
    metrics = rank_features(query, gallery, args.distance, aqe=aqe, roc=args.roc, device=device, **rerank)
    settings = metrics["settings"]
    left_out = settings["gallery_without_identity"]
    steps = (", alpha query expansion" if args.aqe else "") + (f", re-ranked ({args.rerank})" if args.rerank else "")
    print(
        f"{len(query.features)} queries, {settings['num_gallery']} gallery items"
        + (f" ({left_out} without identity left out)" if left_out else "")
        + f"; {settings['model']}, {settings['distance']} distance{steps}"
    )
    print(format_metrics_table(metrics))
    if out is not None:
        write_json_atomic(out, metrics)
        print(f"metrics written to {out}")
    return 0
