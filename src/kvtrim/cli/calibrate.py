"""``kvtrim calibrate``: compute and cache per-model calibration (Q-Filters, ...) from local text."""

from __future__ import annotations

import argparse

from kvtrim.cli.common import MODEL_HELP, positive
from kvtrim.core.files import read_text

CALIBRATIONS = ("qfilters", "query-stats", "duo-heads", "kvzap", "fastkvzip", "lukv", "all")


def add_parser(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser(
        "calibrate", help="compute and cache per-model calibration (Q-Filters, ...) from local text"
    )
    cal.add_argument("--model", default=None, help=MODEL_HELP)
    cal.add_argument(
        "--text",
        action="append",
        default=None,
        help="calibration text file (repeatable; default: bundled prose)",
    )
    cal.add_argument("--sequences", type=positive, default=20, help="number of calibration sequences")
    cal.add_argument("--length", type=positive, default=2048, help="tokens per calibration sequence")
    cal.add_argument(
        "--what",
        choices=CALIBRATIONS,
        action="append",
        default=None,
        help="what to calibrate (repeatable; default: qfilters): "
        "qfilters, query-stats (expected-attention-calibrated), duo-heads (--budget duo), "
        "kvzap (KVzap's predictor of KVzip scores), fastkvzip (Fast KVzip's gates), "
        "lukv (LU-KV's budget curves, --budget lukv) or all",
    )


def run(args: argparse.Namespace) -> int:
    from kvtrim import calibration
    from kvtrim.models import load_model

    wanted = set(args.what or ["qfilters"])
    if "all" in wanted:
        wanted = set(CALIBRATIONS) - {"all"}
    texts = [read_text(path, "Calibration text") for path in args.text] if args.text else None
    model, tokenizer = load_model(args.model)
    sizes = dict(texts=texts, refresh=True, n_sequences=args.sequences, seq_len=args.length)
    if "qfilters" in wanted:
        filters = calibration.load_or_compute_qfilters(model, tokenizer, **sizes)
        print(f"Q-Filters {tuple(filters.shape)} saved to {calibration.qfilters_path(model)}")
    if "query-stats" in wanted:
        mean, _ = calibration.load_or_compute_query_stats(model, tokenizer, **sizes)
        print(f"Query statistics {tuple(mean.shape)} saved to {calibration.query_stats_path(model)}")
    if "duo-heads" in wanted:
        heads = calibration.load_or_compute_duo_heads(
            model, tokenizer, texts=texts, refresh=True, seq_len=args.length
        )
        print(f"Duo head split {tuple(heads.shape)} saved to {calibration.duo_heads_path(model)}")
    if "kvzap" in wanted:
        import kvtrim.strategies  # noqa: F401 - registers KVzip, the teacher KVzap is fitted on

        fitted = calibration.load_or_fit_kvzap(model, tokenizer, **sizes)
        print(f"KVzap weights {tuple(fitted['weights'].shape)} saved to {calibration.kvzap_path(model)}")
        _report_fit(fitted)
    if "fastkvzip" in wanted:
        import kvtrim.strategies  # noqa: F401 - registers KVzip, the teacher the gates learn from

        fitted = calibration.load_or_fit_fastkvzip(model, tokenizer, **sizes)
        print(f"Fast KVzip gates {tuple(fitted['down'].shape)} saved to {calibration.fastkvzip_path(model)}")
        _report_fit(fitted)
    if "lukv" in wanted:
        import kvtrim.strategies  # noqa: F401 - registers KVzip, whose scores are the utility

        curves = calibration.load_or_compute_lukv(model, tokenizer, **sizes)["curves"]
        print(f"LU-KV curves {tuple(curves.shape)} saved to {calibration.lukv_path(model)}")
        _report_curves(curves)
    return 0


def _report_curves(curves) -> None:
    """What the curves do at ratio 0.5: the spread of the layers' shares."""
    layers = curves[49].mean(-1)  # (L,) mean share kept per layer at ratio 0.5
    shares = " ".join(f"{float(s):.2f}" for s in layers)
    print(f"At ratio 0.5 the layers keep (mean over heads): {shares}")


def _report_fit(fitted: dict) -> None:
    """The held-out rank correlation of a surrogate's predictions with KVzip's scores, per layer."""
    trained = fitted["trained"]
    rho = fitted["spearman"][trained]
    if not len(rho) or bool(rho.isnan().all()):
        print("No sequence was held out to measure the fit (give more text or --sequences).")
        return
    per_layer = " ".join(f"{float(r):.2f}" for r in rho)
    print(f"Held-out Spearman with KVzip: mean {float(rho.nanmean()):.3f} (per layer: {per_layer})")
