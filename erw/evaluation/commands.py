"""`erw sample` and `erw evaluate`."""

from __future__ import annotations

import argparse
import json

from erw.config import HeunConvention, OdeSolver, Precision, SamplerMode, choices

METRICS = ("fid", "sfid", "inception_score", "class_accuracy", "precision", "recall")  # scores of metrics.json


def _classes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of class ids, e.g. 0,207,360"
        ) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images from a checkpoint (run under torchrun for several GPUs)",
        description="Generate class-balanced samples from a checkpoint into WebDataset shards. Options left "
        "out take the checkpoint's sample.* settings. The output does not depend on the number of ranks, "
        "and a rerun into the same --out resumes.",
    )
    p.add_argument(
        "--ckpt", required=True, help="checkpoint directory, or a run directory (its latest), local or s3://"
    )
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--num-samples", type=int, help="total images over all ranks (50000 for FID-50K)")
    p.add_argument("--mode", choices=choices(SamplerMode), help="Euler-Maruyama SDE or probability-flow ODE")
    p.add_argument("--solver", choices=choices(OdeSolver), help="ODE solver (--mode ode)")
    p.add_argument(
        "--heun-convention",
        choices=choices(HeunConvention),
        help="trapezoid: a corrector on every step; repa: REPA's samplers.py (no corrector on the last "
        "step, the corrector guided by the predictor's time), to compare FIDs with REPA's",
    )
    p.add_argument(
        "--steps", type=int, help="SDE: velocity evaluations (250 in REPA); ODE: steps (Heun: 2 evaluations each)"
    )
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale; 1 = off")
    p.add_argument("--guidance-low", type=float, help="guidance applies for t in [low, high] (t = 1 is noise)")
    p.add_argument("--guidance-high", type=float, help="upper end of the guidance interval")
    p.add_argument("--batch-size", type=int, help="images per forward pass on each rank")
    p.add_argument("--seed", type=int, help="sample i's noise comes from (seed, i); default: the run's seed")
    p.add_argument("--classes", type=_classes, help="comma-separated class ids to cycle through (default: all)")
    p.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA")
    p.add_argument("--precision", default="fp32", choices=choices(Precision), help="autocast of the model forward")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (ADM layout: arr_0 [N,H,W,3] uint8)")
    p.add_argument(
        "--pushgateway", help="host:port of a Prometheus Pushgateway (default: the run's metrics.pushgateway)"
    )
    p.set_defaults(func=_sample)

    e = sub.add_parser(
        "evaluate",
        help="FID, sFID, Inception Score, precision/recall, sample grid",
        description="Compare samples with a reference: writes metrics.json, grid.png, summary.md and summary.html.",
    )
    e.add_argument("--samples", required=True, help="the --out of `erw sample`, or an .npz with arr_0 images")
    e.add_argument(
        "--reference",
        required=True,
        help="ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz), erw shards with images, "
        "or an ImageFolder / .tar image source",
    )
    e.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    e.add_argument(
        "--inception-weights",
        default="",
        metavar="URI",
        help="torch-fidelity Inception weights (.pth or .safetensors), local or s3://; default: download",
    )
    e.add_argument(
        "--feature-network",
        default="",
        metavar="URI",
        help="a torch.export program (.pt2) to use instead of Inception (small datasets)",
    )
    e.add_argument("--num-samples", type=int, help="evaluate the first N samples (default: all)")
    e.add_argument("--reference-limit", type=int, default=50_000, help="images read from a reference dataset")
    e.add_argument(
        "--reference-cache",
        default="",
        metavar="URI",
        help="where to cache statistics of a reference dataset (default: inside the reference)",
    )
    e.add_argument("--batch-size", type=int, default=64, help="images per feature-network forward")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--grid-rows", type=int, default=10, help="classes shown in grid.png, one row each")
    e.add_argument("--grid-per-class", type=int, default=8, help="images per grid row")
    e.add_argument("--pushgateway", default="", help="host:port of a Prometheus Pushgateway for the metrics")
    e.add_argument("--run-id", default="", help="run label of the pushed metrics (default: the samples' run)")
    e.set_defaults(func=_evaluate)


def _sample(args: argparse.Namespace) -> int:
    from erw import storage
    from erw.evaluation.generate import SampleRequest, run_sampling

    storage.check_writable(args.out, "--out")  # credentials, bucket, URI: before any sampling
    overrides = {
        "num_samples": args.num_samples,
        "mode": args.mode,
        "solver": args.solver,
        "heun_convention": args.heun_convention,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "guidance_low": args.guidance_low,
        "guidance_high": args.guidance_high,
        "batch_size": args.batch_size,
        "use_ema": False if args.raw_weights else None,
    }
    run_sampling(
        SampleRequest(
            ckpt=args.ckpt,
            out=args.out,
            overrides=overrides,
            classes=args.classes,
            seed=args.seed,
            npz=args.npz,
            precision=args.precision,
            pushgateway=args.pushgateway,
        )
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from erw.evaluation.evaluate import EvalOptions, evaluate
    from erw.telemetry import push_metrics

    result = evaluate(
        EvalOptions(
            samples=args.samples,
            reference=args.reference,
            out=args.out,
            inception_weights=args.inception_weights,
            feature_network=args.feature_network,
            batch_size=args.batch_size,
            device=args.device,
            num_samples=args.num_samples,
            reference_limit=args.reference_limit,
            reference_cache=args.reference_cache,
            grid_rows=args.grid_rows,
            grid_per_class=args.grid_per_class,
        )
    )
    pushed = {f"erw_eval_{k}": result[k] for k in METRICS if result[k] is not None}
    run_id = args.run_id or (result.get("sampling") or {}).get("run_id") or ""
    push_metrics(
        args.pushgateway,
        "erw-evaluate",
        run_id,
        pushed
        | {
            "erw_eval_samples": result["num_samples"],
            "erw_eval_seconds": result["seconds"],
        },
    )
    print(json.dumps({k: result[k] for k in (*METRICS, "num_samples")}))
    return 0
