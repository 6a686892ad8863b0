"""One training loop for both ERW phases.

    warmup  phase 1: the L2R model (first l2r_depth blocks + embedders + projector) learns to
            reproduce the frozen encoder's tokens from clean latents at t = 0.
    train   phase 2: the full SiT, optionally initialised from a warmup checkpoint, learns the
            denoising objective plus a decaying alignment term.

The loop is handed an iterator of batches and a checkpoint location; it knows nothing about
S3, shards or Kubeflow. `run` owns the loop, logging, checkpoint cadence, resumption and
preemption; one optimizer step is erw.training.step.train_step, whose noise, times and label
drops are keyed by (seed, step, position in the global batch) (erw.draws), so a run
resumed on the same or another number of ranks draws for every sample what the uninterrupted
run drew.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.nn.parallel import DistributedDataParallel

from erw import draws, faults
from erw.config import Config, PhaseConfig
from erw.data.codec import LatentNorm
from erw.draws import init_seed
from erw.errors import ErwError
from erw.models.sit import l2r_from_config, sit_from_config
from erw.objectives import DiffusionObjective, WarmupObjective
from erw.telemetry import NoMetrics
from erw.training import checkpoint as ckpt
from erw.training import elastic
from erw.training.async_checkpoint import CheckpointWriteError, CheckpointWriter
from erw.training.distributed import Dist, all_reduce_mean, barrier
from erw.training.continuation import continue_from, is_phase2_checkpoint
from erw.training.handoff import init_from_warmup, lineage
from erw.training.step import DataUnavailable, TrainState, any_rank, train_step

NO_METRICS = NoMetrics()  # stateless: one instance serves every run without an exporter


class TrainingDiverged(ErwError):
    pass


class StorageOutage(ErwError):
    """Storage failed mid-run beyond its retry budget; the message says which checkpoint to resume."""


@dataclass
class RunResult:
    checkpoint: str  # URI of the last committed checkpoint
    step: int
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per logged step
    preempted: bool = False
    handoff: list[str] = field(default_factory=list)  # tensors loaded from the warmup (--init-from)


def build_model(cfg: Config, phase: str, encoder_dim: int | None) -> torch.nn.Module:
    size, channels = cfg.data.latent_size, cfg.data.latent_channels
    if phase == "warmup":
        return l2r_from_config(cfg.model, size, channels, encoder_dim)
    return sit_from_config(cfg.model, size, channels, encoder_dim)


def build_objective(cfg: Config, phase: str, warmup_steps: int):
    if phase == "warmup":
        return WarmupObjective()
    return DiffusionObjective(cfg.objective, cfg.model, warmup_steps)


class PreemptionFlag:
    """Set by SIGTERM/SIGINT so a preempted pod checkpoints at the next step before it dies."""

    def __init__(self) -> None:
        self.raised = False
        self.raised_at: float | None = None  # time.monotonic() of the first signal
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.raised:
            self.raised_at = time.monotonic()
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, d: Dist) -> bool:
        """True on every rank when any rank was signalled (all ranks must save together)."""
        return any_rank(self.raised, d)


def restore(
    state: TrainState, phase: str, p: PhaseConfig, resume: str | None, say: Callable[[str], None]
) -> ckpt.Checkpoint | None:
    """Load the checkpoint `resume` names into state ("auto": the newest one under p.out that
    verifies; None: a fresh start), after checking that the run cannot mix with another one."""
    committed = ckpt.list_checkpoints(p.out)
    if resume is None:
        if committed:  # pruning would keep the other run's later steps and delete this one's
            raise ckpt.CheckpointError(
                f"{p.out} already holds checkpoints (steps {', '.join(str(s) for s, _ in committed)}): continue that "
                f"run with --resume auto, or set {phase}.out to a new location for a fresh start"
            )
        return None
    if resume == "auto":
        restored, skipped = ckpt.load_latest_verified(p.out)
        for reason in skipped:
            say(f"--resume auto: skipped {reason}")
        if restored is None:
            say(f"--resume auto: no checkpoint under {p.out} yet, starting {phase} from step 0")
            return None
    else:
        restored = ckpt.load_checkpoint(resume)
        newer = [s for s, _ in committed if s > restored.step]
        if newer:
            raise ckpt.CheckpointError(
                f"{p.out} holds checkpoints newer than {restored.uri} (steps {', '.join(map(str, newer))}): continuing "
                f"from step {restored.step} would mix two runs in one directory. Move those away, or set "
                f"{phase}.out to a new location"
            )
    if restored.phase != phase:
        raise ckpt.CheckpointError(f"cannot resume {phase} from {restored.uri}, a {restored.phase} checkpoint")
    state.load(restored.model_state, restored.ema_state, restored.train_state)
    say(f"resumed {phase} from {restored.uri} at step {state.step}")
    written_with = restored.train_state.get("draws", 1)  # none recorded: before draws were versioned
    if written_with != draws.VERSION:
        say(
            f"note: {restored.uri} was written with draws version {written_with} (1: noise, times and label drops "
            f"keyed by rank), this erw keys them by position in the global batch (version {draws.VERSION}): the run "
            "continues on exactly its samples, with other noise than the erw that wrote it would have drawn"
        )
    if state.step >= p.steps:
        say(
            f"warning: the resumed step {state.step} is at or past {phase}.steps={p.steps}: nothing to train "
            f"(raise {phase}.steps to continue)"
        )
    return restored


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
    metrics: Any = NO_METRICS,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    latent_norm: LatentNorm | None = None,
) -> RunResult:
    """Train one phase to `cfg.<phase>.steps` optimizer steps and return the last checkpoint.

    batches yields {"latent", "label", optionally "image" or "feat"}: micro-batches of
    batch_size / (world_size * grad_accum) samples. If it has state_dict/load_state_dict,
    its position is checkpointed. encoder maps images to target tokens (None: no alignment).
    metrics: a TrainingMetrics exporter (default: none). latent_norm: how the batches' latents were
    normalised (from the shards' manifest), recorded in every checkpoint and checked at the hand-off.
    """
    p: PhaseConfig = getattr(cfg, phase)
    if not p.out:
        raise ErwError(f"{phase}.out is empty: set where checkpoints go, e.g. {phase}.out=s3://bucket/runs/x/{phase}")
    say = log if d.is_main else (lambda _msg: None)
    torch.manual_seed(init_seed(cfg.seed))  # identical initial weights on every rank
    encoder_dim = getattr(encoder, "dim", None) if encoder is not None else None
    model = build_model(cfg, phase, encoder_dim).to(d.device)
    warmup_steps, handoff = 0, []
    run_lineage = lineage(cfg, encoder, latent_norm)
    continuing = bool(init_from) and phase == "train" and is_phase2_checkpoint(init_from)  # continue mode
    if init_from and not continuing:
        if phase != "train":
            raise ErwError("--init-from takes a warmup checkpoint into `erw train`; the warmup itself starts fresh")
        warmup_steps, handoff = init_from_warmup(model, cfg, init_from, run_lineage, say)
    state = TrainState.create(model, p, d.device, warmup_steps=warmup_steps, data=batches)
    if continuing:
        init_from = continue_from(state, cfg, init_from, run_lineage, say)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    restored = restore(state, phase, p, resume, say)
    if restored is not None:
        metrics.observe_restart()

    objective = build_objective(cfg, phase, state.warmup_steps)
    net = DistributedDataParallel(model) if d.enabled else model
    if p.compile:
        net = torch.compile(net)
    micro = p.batch_size // (d.world_size * p.grad_accum)
    say(
        f"{phase}: {sum(q.numel() for q in state.trainable) / 1e6:.1f}M trainable parameters, "
        f"{d.world_size} rank(s) x {micro} samples x {p.grad_accum} accumulation = batch {p.batch_size}, "
        f"steps {state.step}->{p.steps}, precision {p.precision}, device {d.device}"
    )

    writer = CheckpointWriter(  # rank 0 writes; the state is replicated
        p.out,
        p.keep_last,
        asynchronous=p.use_async_checkpoint(d.device.type),
        log=say,
        on_done=metrics.observe_checkpoint,
        last_committed=restored.uri if restored else "",
    )
    # init_from: what this run started from (erw gc keeps it while the run is kept)
    extra_meta = {"warmup_steps": state.warmup_steps, "lineage": run_lineage, "init_from": init_from or ""}

    def save(wait: bool) -> str:
        """Checkpoint the current step; wait: until it is committed on every rank's view."""
        if d.is_main:
            writer.submit(state, phase=phase, config=cfg, extra_meta=extra_meta)
            if wait:
                writer.wait()
        if wait:
            barrier(d)
        return writer.last_committed

    grace_s = elastic.grace_period_s(p.grace_period_s)

    def save_within_grace(signalled_at: float) -> str:
        """The SIGTERM path: write what fits in the grace period from the signal, and say so."""
        if d.is_main:
            deadline = signalled_at + grace_s
            if not writer.wait(timeout=max(0.0, deadline - time.monotonic())):
                say(
                    f"{phase}: the checkpoint write in progress did not finish within the grace period of "
                    f"{grace_s:g}s ({phase}.grace_period_s); exiting without it (it stays uncommitted, never loaded)"
                )
            else:
                left, needs = deadline - time.monotonic(), writer.last_seconds
                if needs is not None and needs > left:
                    say(
                        f"{phase}: no checkpoint of step {state.step}: the last write took {needs:.1f}s and {left:.1f}s "
                        f"of the grace period of {grace_s:g}s ({phase}.grace_period_s) are left; resume will start "
                        f"from {writer.last_committed or 'the previous run checkpoint'}"
                    )
                else:
                    started = time.monotonic()
                    writer.submit(state, phase=phase, config=cfg, extra_meta=extra_meta)
                    writer.wait()
                    say(
                        f"{phase}: checkpointed step {state.step} in {time.monotonic() - started:.1f}s "
                        f"(grace period {grace_s:g}s from the signal)"
                    )
        barrier(d)
        return writer.last_committed

    def stop_on_storage_failure(err: DataUnavailable, position: Any) -> StorageOutage:
        """The data's storage failed beyond its retry budget at a step boundary, on this rank or
        another: every rank stops there (erw.training.step.agree_on_data), with the state of step
        state.step whole (the optimizer has not stepped). The loader goes back to `position`, the
        step's start (this rank may have taken the step's first batch), and rank 0 checkpoints the
        step before every rank exits; the message says what to resume from."""
        stopped = f"{phase} stopped at step {state.step}: {err}"
        if position is not None:
            state.data.load_state_dict(position)
        failed: CheckpointWriteError | None = None
        if d.is_main:  # the state is replicated: rank 0 writes, as for every checkpoint
            target = ckpt.step_uri(p.out, state.step)
            try:
                writer.wait()  # a write in flight first (it may be this very step)
                if writer.last_committed != target:
                    say(f"{phase}: storage failed at step {state.step}; checkpointing step {state.step} before exiting")
                    writer.submit(state, phase=phase, config=cfg, extra_meta=extra_meta)
                    writer.wait()
            except CheckpointWriteError as error:
                failed = error
        barrier(d)  # the others wait for the write: their exit would make torchrun stop rank 0
        if not d.is_main:
            return StorageOutage(f"rank {d.rank}: {stopped}. Rank 0 checkpoints step {state.step} (see its error)")
        if failed is not None:
            return StorageOutage(f"{stopped}\nThe checkpoint of step {state.step} before exiting failed too: {failed}")
        return StorageOutage(
            f"{stopped}\nStep {state.step} is checkpointed at {writer.last_committed}: "
            "`--resume auto` continues from it once the storage is back"
        )

    iterator = faults.batches(iter(batches), d.rank)
    history: list[dict[str, float]] = []
    last_uri = restored.uri if restored else ""
    position = None  # the batch source's position at the start of the step (several ranks only)
    preempted = False
    nonfinite_in_row = 0
    window = {"samples": 0, "seconds": 0.0, "data": 0.0}
    try:
        with PreemptionFlag() as preempt:
            while state.step < p.steps:
                started = time.perf_counter()
                # With several ranks a rank may take this step's first batch before another's storage
                # fails: the position to checkpoint then is this one (a few ints, read per step).
                position = state.data.state_dict() if d.enabled and hasattr(state.data, "state_dict") else None
                stats = train_step(state, iterator, objective, p, seed=cfg.seed, dist_state=d, net=net, encoder=encoder)
                if stats.skipped:
                    nonfinite_in_row += 1
                    metrics.observe_nonfinite()
                    say(f"step {state.step}: non-finite loss or gradient, step skipped ({nonfinite_in_row} in a row)")
                    if nonfinite_in_row >= p.max_nonfinite:
                        raise TrainingDiverged(
                            f"{phase} stopped at step {state.step}: {nonfinite_in_row} non-finite steps in a row "
                            f"({phase}.max_nonfinite={p.max_nonfinite}). Check the data for NaN/Inf, lower "
                            f"{phase}.lr, or use precision=bf16 instead of fp16; resume from "
                            f"{writer.last_committed or last_uri or 'scratch'}."
                        )
                    continue
                nonfinite_in_row = 0
                step = state.step
                faults.after_step(d.rank, step)
                seconds = time.perf_counter() - started
                window["samples"] += p.batch_size
                window["seconds"] += seconds
                window["data"] += stats.data_wait
                metrics.observe_step(  # an exporter reads the tensors (a host sync); NoMetrics does not
                    step=step,
                    samples=p.batch_size // d.world_size,
                    losses={k: v for k, v in stats.logs.items() if k.startswith("loss")},
                    align_weight=stats.logs.get("align_weight"),
                    lr=p.lr,
                    grad_norm=stats.grad_norm,
                    step_seconds=seconds,
                    data_wait_seconds=stats.data_wait,
                )
                if step % p.log_every == 0 or step == p.steps:
                    logs = {k: float(v) for k, v in stats.logs.items()}
                    loss_mean = float(all_reduce_mean(stats.logs["loss"], d))
                    grad_norm = float(stats.grad_norm)
                    history.append({"step": step, **logs, "loss": loss_mean, "grad_norm": grad_norm})
                    if on_log is not None:  # e.g. erw.tracking's MLflow run
                        on_log(history[-1])
                    detail = " ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "loss")
                    say(
                        f"{phase} step {step}/{p.steps} | loss {loss_mean:.4f} | {detail} | grad {grad_norm:.3f} | "
                        f"{window['samples'] / window['seconds']:.1f} samples/s | data wait "
                        f"{100 * window['data'] / window['seconds']:.0f}%"
                    )
                    window = {"samples": 0, "seconds": 0.0, "data": 0.0}
                    metrics.observe_memory(d.device)
                if step % p.ckpt_every == 0 or step == p.steps:
                    last_uri = save(wait=step == p.steps) or last_uri
                elif preempt.agreed(d):
                    say(f"{phase}: termination signal received, checkpointing at step {step} and exiting")
                    preempted = True
                    uri = save_within_grace(preempt.raised_at or time.monotonic())
                    return RunResult(checkpoint=uri, step=step, history=history, preempted=True, handoff=handoff)
    except DataUnavailable as err:  # every rank raises it at the same step (a failed checkpoint write does not)
        raise stop_on_storage_failure(err, position) from None
    finally:
        if not preempted and d.is_main and writer.in_flight:  # a crash: the snapshot in flight is still good
            try:
                writer.wait()
            except Exception as err:  # broad on purpose: the crash in progress is the error to report
                say(f"{phase}: the checkpoint write in progress failed too: {err}")
        # Shut the batch source down (its DataLoader workers ignore SIGTERM): an exception's
        # traceback keeps this frame alive, and with it the workers, so the process would never exit.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if not last_uri and d.is_main:  # resumed at or past the final step: nothing new to save
        last_uri = ckpt.latest_checkpoint(p.out) or ""
    return RunResult(checkpoint=last_uri, step=state.step, history=history, handoff=handoff)
