"""One training loop for both ERW phases.

    warmup  phase 1: the L2R model (first l2r_depth blocks + embedders + projector) learns to
            reproduce the frozen encoder's tokens from clean latents at t = 0.
    train   phase 2: the full SiT, optionally initialised from a warmup checkpoint, learns the
            denoising objective plus a decaying alignment term.

The loop is handed an iterator of batches and a checkpoint location; it knows nothing about
S3, shards or Kubeflow. Randomness is re-seeded from (seed, rank, step) at every step, so a
resumed run draws exactly the noise, times and label drops the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from erw.config import Config, PhaseConfig
from erw.errors import ErwError
from erw.models.sit import check_warmup_config, l2r_from_config, load_warmup, sit_from_config
from erw.objectives import DiffusionObjective, WarmupObjective
from erw.training import checkpoint as ckpt
from erw.training.distributed import Dist, all_reduce_mean, barrier

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(ErwError):
    pass


@dataclass
class RunResult:
    checkpoint: str  # URI of the last committed checkpoint
    step: int
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per logged step
    preempted: bool = False


def build_model(cfg: Config, phase: str, encoder_dim: int | None) -> torch.nn.Module:
    size, channels = cfg.data.latent_size, cfg.data.latent_channels
    if phase == "warmup":
        return l2r_from_config(cfg.model, size, channels, encoder_dim)
    return sit_from_config(cfg.model, size, channels, encoder_dim)


def init_from_warmup(model: torch.nn.Module, cfg: Config, uri: str, log: Callable[[str], None]) -> int:
    """Load a warmup checkpoint's embedders and first l2r_depth blocks; return its step count W."""
    warm = ckpt.load_checkpoint(uri, with_train_state=False)
    if warm.phase != "warmup":
        raise ckpt.CheckpointError(f"--init-from {warm.uri} is a {warm.phase!r} checkpoint; expected one from `erw warmup`")
    check_warmup_config(cfg.model, warm.config().model)
    loaded = load_warmup(model, warm.model_state, cfg.model.l2r_depth)
    log(f"init-from {warm.uri} (warmup step {warm.step}): loaded {len(loaded)} tensors: {', '.join(loaded)}")
    return warm.step


class PreemptionFlag:
    """Set by SIGTERM/SIGINT so a preempted pod checkpoints at the next step before it dies."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, d: Dist) -> bool:
        """True on every rank when any rank was signalled (all ranks must save together)."""
        return any_rank(self.raised, d)


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when flag is true on at least one."""
    if not d.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p.detach(), 1.0 - decay)


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def run(
    cfg: Config,
    phase: str,
    batches: Iterable[dict[str, torch.Tensor]],
    d: Dist,
    *,
    encoder: torch.nn.Module | None = None,
    init_from: str | None = None,
    resume: str | None = None,
    log: Callable[[str], None] = print,
    metrics: Any = None,
) -> RunResult:
    """Train one phase to `cfg.<phase>.steps` optimizer steps and return the last checkpoint.

    batches yields {"latent", "label", optionally "image" or "feat"}: micro-batches of
    batch_size / (world_size * grad_accum) samples. If it has state_dict/load_state_dict,
    its position is checkpointed. encoder maps images to target tokens (None: no alignment).
    """
    p: PhaseConfig = getattr(cfg, phase)
    if not p.out:
        raise ErwError(f"{phase}.out is empty: set where checkpoints go, e.g. {phase}.out=s3://bucket/runs/x/{phase}")
    say = log if d.is_main else (lambda _msg: None)
    torch.manual_seed(step_seed(cfg.seed, 0, 0))  # identical initial weights on every rank
    encoder_dim = getattr(encoder, "dim", None) if encoder is not None else None
    model = build_model(cfg, phase, encoder_dim).to(d.device)
    warmup_steps = 0
    if init_from:
        if phase != "train":
            raise ErwError("--init-from takes a warmup checkpoint into `erw train`; the warmup itself starts fresh")
        warmup_steps = init_from_warmup(model, cfg, init_from, say)
    ema = copy.deepcopy(model).requires_grad_(False)
    trainable = [q for q in model.parameters() if q.requires_grad]  # pos_embed is fixed
    optimizer = torch.optim.AdamW(trainable, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay)
    autocast_dtype = AUTOCAST_DTYPES[p.precision]
    scaler = torch.amp.GradScaler(d.device.type, enabled=p.precision == "fp16" and d.device.type == "cuda")
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    step = 0
    restored = None
    source = ckpt.latest_checkpoint(p.out) if resume == "auto" else resume
    if source:
        restored = ckpt.load_checkpoint(source)
        if restored.phase != phase:
            raise ckpt.CheckpointError(f"cannot resume {phase} from {restored.uri}, a {restored.phase} checkpoint")
        model.load_state_dict(restored.model_state)
        ema.load_state_dict(restored.ema_state)
        state = restored.train_state
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, warmup_steps = int(state["step"]), int(state["warmup_steps"])
        if state.get("data") is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["data"])
        say(f"resumed {phase} from {restored.uri} at step {step}")
        if metrics is not None:
            metrics.observe_restart()

    objective = (
        WarmupObjective() if phase == "warmup" else DiffusionObjective(cfg.objective, cfg.model, warmup_steps)
    )
    net = DistributedDataParallel(model) if d.enabled else model
    if p.compile:
        net = torch.compile(net)
    micro = p.batch_size // (d.world_size * p.grad_accum)
    say(
        f"{phase}: {sum(q.numel() for q in trainable) / 1e6:.1f}M trainable parameters, "
        f"{d.world_size} rank(s) x {micro} samples x {p.grad_accum} accumulation = batch {p.batch_size}, "
        f"steps {step}->{p.steps}, precision {p.precision}, device {d.device}"
    )

    def save(at_step: int) -> str:
        started = time.perf_counter()
        uri = ""
        try:
            if d.is_main:
                uri = write_checkpoint(at_step)
            barrier(d)
        except BaseException:
            if metrics is not None:
                metrics.observe_checkpoint(time.perf_counter() - started, ok=False)
            raise
        if metrics is not None:
            metrics.observe_checkpoint(time.perf_counter() - started, ok=True)
        return uri

    def write_checkpoint(at_step: int) -> str:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": at_step,
            "warmup_steps": warmup_steps,
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
        }
        uri = ckpt.save_checkpoint(
            p.out, step=at_step, phase=phase, config=cfg,
            model_state=model.state_dict(), ema_state=ema.state_dict(), train_state=train_state,
            extra_meta={"warmup_steps": warmup_steps},
        )
        ckpt.prune_checkpoints(p.out, p.keep_last)
        say(f"checkpoint {uri}")
        return uri

    iterator: Iterator = iter(batches)
    history: list[dict[str, float]] = []
    last_uri = restored.uri if restored else ""
    nonfinite_in_row = 0
    window = {"samples": 0, "seconds": 0.0, "data": 0.0}
    with PreemptionFlag() as preempt:
        while step < p.steps:
            torch.manual_seed(step_seed(cfg.seed, d.rank, step))
            started = time.perf_counter()
            data_wait = 0.0
            logs_sum: dict[str, float] = {}
            for i in range(p.grad_accum):
                fetch = time.perf_counter()
                batch = next(iterator)
                data_wait += time.perf_counter() - fetch
                x = batch["latent"].to(d.device, non_blocking=True)
                y = batch["label"].to(d.device, non_blocking=True)
                targets = alignment_targets(batch, encoder, d.device)
                sync = contextlib.nullcontext() if (i == p.grad_accum - 1 or not d.enabled) else net.no_sync()
                with sync, torch.autocast(d.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, logs = objective(net, x, y, targets, step)
                scaler.scale(loss / p.grad_accum).backward()
                logs = {"loss": loss.detach(), **logs}
                for key, value in logs.items():
                    logs_sum[key] = logs_sum.get(key, 0.0) + float(value) / p.grad_accum
            scaler.unscale_(optimizer)
            max_norm = p.grad_clip if p.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            # Gradients are all-reduced, so every rank sees the same norm and skips together. With
            # fp16 the grad scaler skips overflowing steps itself; only a non-finite loss counts then.
            if scaler.is_enabled():
                nonfinite = any_rank(not math.isfinite(logs_sum["loss"]), d)
            else:
                nonfinite = not bool(torch.isfinite(grad_norm))
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                nonfinite_in_row += 1
                if metrics is not None:
                    metrics.observe_nonfinite()
                say(f"step {step}: non-finite loss or gradient, step skipped ({nonfinite_in_row} in a row)")
                if nonfinite_in_row >= p.max_nonfinite:
                    raise TrainingDiverged(
                        f"{phase} stopped at step {step}: {nonfinite_in_row} non-finite steps in a row "
                        f"({phase}.max_nonfinite={p.max_nonfinite}). Check the data for NaN/Inf, lower "
                        f"{phase}.lr, or use precision=bf16 instead of fp16; resume from {last_uri or 'scratch'}."
                    )
                continue
            nonfinite_in_row = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, model, p.ema_decay)
            step += 1

            seconds = time.perf_counter() - started
            window["samples"] += p.batch_size
            window["seconds"] += seconds
            window["data"] += data_wait
            if metrics is not None:
                metrics.observe_step(
                    step=step, samples=p.batch_size // d.world_size, losses={k: v for k, v in logs_sum.items() if k.startswith("loss")},
                    align_weight=logs_sum.get("align_weight"), lr=p.lr, grad_norm=float(grad_norm),
                    step_seconds=seconds, data_wait_seconds=data_wait,
                )
            if step % p.log_every == 0 or step == p.steps:
                loss_mean = float(all_reduce_mean(torch.tensor(logs_sum["loss"], device=d.device), d))
                record = {"step": step, **logs_sum, "loss": loss_mean, "grad_norm": float(grad_norm)}
                history.append(record)
                detail = " ".join(f"{k} {v:.4f}" for k, v in logs_sum.items() if k != "loss")
                say(
                    f"{phase} step {step}/{p.steps} | loss {loss_mean:.4f} | {detail} | grad {float(grad_norm):.3f} | "
                    f"{window['samples'] / window['seconds']:.1f} samples/s | data wait "
                    f"{100 * window['data'] / window['seconds']:.0f}%"
                )
                window = {"samples": 0, "seconds": 0.0, "data": 0.0}
                if metrics is not None:
                    metrics.observe_memory(d.device)
            if step % p.ckpt_every == 0 or step == p.steps:
                last_uri = save(step)
            elif preempt.agreed(d):
                say(f"{phase}: termination signal received, checkpointing at step {step} and exiting")
                return RunResult(checkpoint=save(step), step=step, history=history, preempted=True)
    if not last_uri and d.is_main:  # resumed at or past the final step: nothing new to save
        last_uri = ckpt.latest_checkpoint(p.out) or ""
    return RunResult(checkpoint=last_uri, step=step, history=history)


def alignment_targets(batch: dict[str, torch.Tensor], encoder, device: torch.device) -> torch.Tensor | None:
    """Encoder tokens of the clean image: cached in the shards ("feat") or computed online."""
    if encoder is None:
        return None
    if "feat" in batch:
        return batch["feat"].to(device, non_blocking=True).float()
    if "image" not in batch:
        raise ErwError(
            "alignment needs encoder targets but the shards hold neither images nor cached features: "
            "precompute with --store images (or --store features), or set encoder.name=none"
        )
    with torch.no_grad():
        return encoder(batch["image"].to(device, non_blocking=True))
