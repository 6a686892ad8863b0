"""`erw warmup` and `erw train`: config -> data, encoder, metrics -> the training loop."""

from __future__ import annotations

import argparse
import os
import time

from erw.errors import PREEMPTED


def register(sub: argparse._SubParsersAction) -> None:
    for phase, help_text in (
        ("warmup", "ERW phase 1: train the L2R blocks to reproduce the frozen encoder's representation"),
        ("train", "phase 2: full diffusion training (optionally from a warmup checkpoint)"),
    ):
        p = sub.add_parser(phase, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=2e-4")
        p.add_argument(
            "--resume",
            default=None,
            metavar="auto|URI",
            help="auto: continue from the latest complete checkpoint in <phase>.out (fresh start if none)",
        )
        if phase == "train":
            p.add_argument(
                "--init-from",
                default=None,
                metavar="URI",
                help="warmup checkpoint (or its run directory); a checkpoint of `erw train` (e.g. the published model) continues it: continue mode",
            )
        p.set_defaults(func=_run, phase=phase)
    p = sub.add_parser(
        "torchrun",
        add_help=False,
        prefix_chars="\0",  # every argument is torchrun's, --help included
        help="torchrun that exits 143 when preempted (SIGTERM) and 1 when failed; same arguments",
        description="torchrun (torch.distributed.run) with preemption-aware exit status",
    )
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, metavar="TORCHRUN_ARGS")
    p.set_defaults(func=_torchrun)


def _torchrun(args: argparse.Namespace) -> int:
    from erw.training.elastic import torchrun

    return torchrun(args.torchrun_args)


def run_id_for(cfg_run_id: str) -> str:
    """One id shared by all ranks: config, then the launcher's, then torchrun's, then the clock."""
    return (
        cfg_run_id
        or os.environ.get("ERW_RUN_ID")
        or os.environ.get("TORCHELASTIC_RUN_ID", "").replace("none", "")
        or time.strftime("run-%Y%m%d-%H%M%S")
    )


def _run(args: argparse.Namespace) -> int:

    from erw.config import load_config, validate
    from erw.data.codec import LatentNorm
    from erw import storage
    from erw.data.loader import build_loader
    from erw.telemetry import TrainingMetrics
    from erw.tracking import run_logger
    from erw.models.encoders import load_encoder
    from erw.training import trainer
    from erw.training.distributed import init_distributed, shutdown, world_size_from_env

    phase = args.phase
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size=world_size_from_env(), phase=phase)  # before any process group or GPU work
    storage.check_writable(getattr(cfg, phase).out, f"{phase}.out")  # credentials, bucket, URI: before compute
    cfg.run_id = run_id_for(cfg.run_id)
    d = init_distributed()
    try:
        p = getattr(cfg, phase)
        aligns = cfg.encoder.name != "none" and (phase == "warmup" or cfg.objective.resolved_align_coeff(cfg.model) > 0)
        encoder = load_encoder(cfg.encoder, cfg.data.resolution, d.device) if aligns else None
        micro_batch = p.batch_size // (d.world_size * p.grad_accum)
        batches = build_loader(
            cfg.data,
            micro_batch,
            d.rank,
            d.world_size,
            cfg.seed,
            with_images=aligns,
            global_batch=p.batch_size,
            num_classes=cfg.model.num_classes,
        )
        metrics = TrainingMetrics(
            cfg.metrics.port, cfg.run_id, phase, d.rank, d.local_rank, checkpoint_every=p.ckpt_every
        )
        tracking = run_logger(cfg, phase, d.is_main)
        status = "FAILED"
        try:
            result = trainer.run(
                cfg,
                phase,
                batches,
                d,
                encoder=encoder,
                init_from=getattr(args, "init_from", None),
                resume=args.resume,
                log=lambda msg: print(msg, flush=True),
                metrics=metrics,
                latent_norm=LatentNorm.from_manifest(batches.manifest),
                on_log=tracking.log if tracking else None,
            )
            status = "KILLED" if result.preempted else "FINISHED"
        finally:
            metrics.close()
            if tracking:
                tracking.finish(status)
        if d.is_main:
            state = "preempted at" if result.preempted else "finished at"
            print(f"{phase} {state} step {result.step}: {result.checkpoint}", flush=True)
        return PREEMPTED if result.preempted else 0
    finally:
        shutdown(d)
