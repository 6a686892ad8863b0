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
    p.add_argument("--source", default="", help="ImageFolder (one folder per class) or .tar shards of jpg|png + cls")
    p.add_argument("--out", required=True, help="the dataset: directory or s3://bucket/prefix (data.shards)")
    p.add_argument("--cache", default="", metavar="URI",
                   help="store of encoded units for these settings, shared by datasets (default: --out); "
                        "a rerun or another dataset reuses every unit already encoded there")
    p.add_argument("--resolution", type=int, default=256, help="side of the ADM centre crop (default 256)")
    p.add_argument("--codec", default="sd-vae-ft-ema", help="identity | sd-vae-ft-ema | sd-vae-ft-mse")
    p.add_argument("--codec-weights", default="", metavar="URI",
                   help="diffusers AutoencoderKL directory, local or s3://; empty = Hugging Face hub")
    p.add_argument("--latent-norm", default="scale", choices=("scale", "channel"),
                   help="model space: latent * scaling factor (default) or per-channel (latent - mean) / std")
    p.add_argument("--worker-index", type=int, default=0, help="this worker's index, 0..n-1")
    p.add_argument("--num-workers", type=int, default=1,
                   help="workers of the fan-out (a lone worker also writes manifest.json); with --merge, "
                        "names the workers to rerun when shards are missing")
    p.add_argument("--store", default="images", choices=("images", "features"),
                   help="keep the centre crop (online encoder targets) or cached encoder tokens")
    p.add_argument("--image-format", default="png", choices=("png", "jpg", "npy"),
                   help="stored crop: png (lossless, default), jpg (quality 95, smallest), npy (raw pixels: "
                        "no decoding in the loader, largest)")
    p.add_argument("--encoder", default="", help="--store features: encoder registry name, e.g. dinov2-vit-b")
    p.add_argument("--encoder-weights", default="", metavar="URI", help="--store features: encoder weights")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (ImageFolder sources)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (summary lines only)")
    p.add_argument("--merge", action="store_true", help="check every shard is done and write manifest.json")
    p.add_argument("--dry-run", action="store_true",
                   help="list the source and the store only: print how many units would be reused and encoded")
    p.add_argument("--pushgateway", default="", help="host:port of a Prometheus Pushgateway for this worker's results")
    p.add_argument("--run-id", default="", help="run label of the pushed metrics (default: $ERW_RUN_ID)")
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
    from erw.data import precompute
    from erw.telemetry import push_metrics

    storage.check_writable(args.out, "--out")  # credentials, bucket, URI: before any encoding
    if args.merge:
        precompute.merge(args.out, args.num_workers if args.num_workers > 1 else None)
        return 0
    job = precompute.PrecomputeJob(
        source=args.source, out=args.out, cache=args.cache, resolution=args.resolution, codec=args.codec,
        codec_weights=args.codec_weights, worker_index=args.worker_index, num_workers=args.num_workers,
        store=args.store, image_format=args.image_format, latent_norm=args.latent_norm,
        batch_size=args.batch_size, shard_size=args.shard_size, encoder=args.encoder,
        encoder_weights=args.encoder_weights, device=args.device,
    )
    if args.dry_run:
        print(precompute.plan_precompute(job).summary())
        return 0
    report = precompute.run_worker(job, progress=not args.no_progress)
    push_metrics(args.pushgateway, "erw-precompute", args.run_id or os.environ.get("ERW_RUN_ID", ""), {
        "erw_precompute_units_reused_total": report.shards_skipped,
        "erw_precompute_units_encoded_total": report.shards_written,
        "erw_precompute_images_total": report.images,
        "erw_precompute_failed_images_total": report.failures,
        "erw_precompute_images_per_second": report.images_per_second,
        "erw_precompute_seconds": report.seconds,
    }, labels={"worker": str(args.worker_index)})
    return 0


def _digits(args: argparse.Namespace) -> int:
    from erw.data.digits import write_digits

    count = write_digits(args.out)
    print(f"wrote {count} digit images in 10 class folders to {args.out}")
    return 0
