"""`erw precompute` and `erw data digits`."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "precompute",
        help="encode images into latent shards (one worker of a fan-out, or --merge)",
        description=(
            "Encode an ImageFolder or image tar shards (local or s3://) into WebDataset latent shards. "
            "Run n workers with --worker-index 0..n-1, then once with --merge to write manifest.json. "
            "Incremental: a unit of the source (an input tar, or a chunk of an ImageFolder) whose files are "
            "unchanged since an earlier run under the same settings is reused, not encoded again."
        ),
    )
    p.add_argument(
        "--config",
        help="YAML preset: data.source, data.shards, data.resolution, data.codec[_weights] "
        "and the precompute section (default: the built-in defaults)",
    )
    p.add_argument("--worker-index", type=int, default=0, help="this worker's index, 0..n-1")
    p.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="workers of the fan-out (a lone worker also writes manifest.json); with --merge, "
        "names the workers to rerun when shards are missing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (summary lines only)")
    p.add_argument("--merge", action="store_true", help="check every shard is done and write manifest.json")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the source and the store only: print how many units would be reused and encoded",
    )
    p.add_argument(
        "--pushgateway",
        help="host:port of a Prometheus Pushgateway for this worker's results "
        "(default: the config's metrics.pushgateway)",
    )
    p.add_argument("--run-id", default="", help="run label of the pushed metrics (default: $ERW_RUN_ID)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. data.source=s3://data/images data.shards=s3://data/latents",
    )
    p.set_defaults(func=_precompute)

    data = sub.add_parser("data", help="demo datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    digits = data_sub.add_parser(
        "digits", help="scikit-learn's 1,797 handwritten digits as a 32x32 RGB ImageFolder (no download)"
    )
    digits.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    digits.set_defaults(func=_digits)


def _precompute(args: argparse.Namespace) -> int:
    from erw import storage
    from erw.config import load_config
    from erw.data import precompute
    from erw.telemetry import push_metrics

    cfg = load_config(args.config, args.overrides)
    shards = cfg.data.shards
    if not shards:
        raise precompute.PrecomputeError("data.shards is empty: set data.shards=URI, where the latent shards go")
    storage.check_writable(shards, "data.shards")  # credentials, bucket, URI: before any encoding
    if args.merge:
        precompute.merge(shards, args.num_workers if args.num_workers > 1 else None)
        return 0
    job = precompute.PrecomputeJob.from_config(cfg, args.worker_index, args.num_workers)
    if args.dry_run:
        print(precompute.plan_precompute(job).summary())
        return 0
    report = precompute.run_worker(job, progress=not args.no_progress)
    gateway = cfg.metrics.pushgateway if args.pushgateway is None else args.pushgateway
    push_metrics(
        gateway,
        "erw-precompute",
        args.run_id or os.environ.get("ERW_RUN_ID", ""),
        {
            "erw_precompute_units_reused_total": report.shards_skipped,
            "erw_precompute_units_encoded_total": report.shards_written,
            "erw_precompute_images_total": report.images,
            "erw_precompute_failed_images_total": report.failures,
            "erw_precompute_images_per_second": report.images_per_second,
            "erw_precompute_seconds": report.seconds,
        },
        labels={"worker": str(args.worker_index)},
    )
    return 0


def _digits(args: argparse.Namespace) -> int:
    from erw.data.digits import write_digits

    count = write_digits(args.out)
    print(f"wrote {count} digit images in 10 class folders to {args.out}")
    return 0
