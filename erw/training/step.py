"""One optimizer step, and the state it advances.

`TrainState` is everything a checkpoint must hold to continue a run exactly: the model, its EMA,
the optimizer, the grad scaler, the step counters and the batch source's position.
`train_step` is the unit the trainer loops over and the benchmarks time: gradient accumulation
under autocast, unscale and clipping, the non-finite guard, the optimizer and the EMA update.
Nothing here logs, checkpoints or knows about signals: that is `trainer.run`'s job.

The step reads nothing back from the device while it accumulates: losses stay tensors until the
caller asks (on its logging interval). The one read per step is the finiteness of the gradient
norm, which decides whether the optimizer may step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from erw.config import PhaseConfig
from erw.errors import ErwError
from erw.storage import StorageError
from erw.training.distributed import Dist
from erw import draws as sample_draws
from erw.draws import StepDraws, step_seed

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SINGLE_PROCESS = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@dataclass
class TrainState:
    """What one phase of training advances, and what its checkpoint stores."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer steps taken in this phase
    warmup_steps: int = 0  # length W of the ERW warmup phase 2 started from (0: none)
    data: Any = None  # the batch source, when it can checkpoint its position (state_dict/load_state_dict)
    _ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        pairs = [(e, p) for e, p in zip(self.ema.parameters(), self.model.parameters()) if p.requires_grad]
        self._ema_pairs = ([e for e, _ in pairs], [p for _, p in pairs])

    @classmethod
    def create(
        cls,
        model: torch.nn.Module,
        phase_cfg: PhaseConfig,
        device: torch.device,
        *,
        warmup_steps: int = 0,
        data: Any = None,
    ) -> "TrainState":
        """A fresh state for `model` (already on `device`, hand-off already loaded): the EMA starts
        as a copy of the model, AdamW over the trainable parameters (pos_embed is fixed)."""
        ema = copy.deepcopy(model).requires_grad_(False)
        trainable = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable,
            lr=phase_cfg.lr,
            betas=phase_cfg.betas,
            weight_decay=phase_cfg.weight_decay,
            fused=phase_cfg.use_fused_optimizer(device.type),
        )
        scaler = torch.amp.GradScaler(device.type, enabled=phase_cfg.precision == "fp16" and device.type == "cuda")
        return cls(model, ema, optimizer, scaler, warmup_steps=warmup_steps, data=data)

    @property
    def trainable(self) -> list[torch.Tensor]:
        return self._ema_pairs[1]

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * model, over every trainable tensor in one kernel
        launch per chunk (foreach) rather than one per tensor."""
        ema, params = self._ema_pairs
        torch._foreach_lerp_(ema, params, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's state.pt: everything but the weights (those go to safetensors files)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "warmup_steps": self.warmup_steps,
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "draws": sample_draws.VERSION,  # how the step's random draws were keyed
        }

    def load(
        self, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor], train_state: dict[str, Any]
    ) -> None:
        """Restore from a checkpoint's three parts (the inverse of model/ema state_dict + state_dict())."""
        self.model.load_state_dict(model_state)
        self.ema.load_state_dict(ema_state)
        self.optimizer.load_state_dict(train_state["optimizer"])
        self.scaler.load_state_dict(train_state["scaler"])
        self.step, self.warmup_steps = int(train_state["step"]), int(train_state["warmup_steps"])
        if train_state.get("data") is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(train_state["data"])


@dataclass
class StepStats:
    """What one step reports. Losses are device tensors: reading them costs a host sync, so the
    caller does it only when it logs (or when a metrics exporter wants them)."""

    skipped: bool  # non-finite loss or gradient: the optimizer did not step
    logs: dict[str, torch.Tensor]  # loss and the objective's terms, averaged over the micro-batches
    grad_norm: torch.Tensor  # before clipping
    data_wait: float  # seconds spent waiting for batches


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when flag is true on at least one."""
    if not d.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class DataUnavailable(ErwError):
    """The batch source of this rank, or of another, failed on storage (beyond its retry budget)
    at the start of a step; every rank raises it at the same step boundary."""


def agree_on_data(failure: StorageError | None, d: Dist) -> None:
    """Raise DataUnavailable on every rank when any rank's first batch of the step failed on
    storage: a rank whose data failed must not leave the others waiting in the step's gradient
    all-reduce, where nothing could checkpoint. One small all-reduce per step with several ranks;
    none alone."""
    if any_rank(failure is not None, d):
        raise DataUnavailable(
            str(failure)
            if failure is not None
            else f"another rank could not read its data (rank {d.rank} could): see that rank's error"
        )


def next_batch(batch_iter: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The next batch, drawn outside the step's random stream: a batch source that uses the
    global RNG (a DataLoader draws its base seed from it when its workers start) must not shift
    the noise of the step, or a resumed run would differ from the uninterrupted one."""
    with torch.random.fork_rng(devices=[]):
        return next(batch_iter)


def train_step(
    state: TrainState,
    batch_iter: Iterator[dict[str, torch.Tensor]],
    objective: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
    phase_cfg: PhaseConfig,
    *,
    seed: int,
    dist_state: Dist = SINGLE_PROCESS,
    net: torch.nn.Module | None = None,
    encoder: torch.nn.Module | None = None,
) -> StepStats:
    """Take one optimizer step from phase_cfg.grad_accum micro-batches of batch_iter.

    net is what runs the forward (the model wrapped in DDP and/or torch.compile; default the bare
    model). The objective's per-sample draws are keyed by (seed, state.step, the sample's position
    in the global batch: batch["position"], else laid out as the shard loader does), the global
    RNG by (seed, rank, state.step) (erw.draws): a resumed run draws the same for every
    sample, on the same or another world size. A non-finite loss or gradient skips the optimizer
    and the EMA (every rank agrees: gradients are all-reduced) and leaves state.step where it was."""
    d, p = dist_state, phase_cfg
    net = state.model if net is None else net
    autocast_dtype = AUTOCAST_DTYPES[p.precision]
    torch.manual_seed(step_seed(seed, d.rank, state.step))
    draws = StepDraws(seed, state.step, p.batch_size, d.device)
    data_wait = 0.0
    logs_sum: dict[str, torch.Tensor] = {}
    for i in range(p.grad_accum):
        fetch = time.perf_counter()
        failure = None
        try:
            batch = next_batch(batch_iter)
        except StorageError as err:
            if i > 0:  # mid-step: the other ranks are past the agreement; a plain error
                raise
            failure = err
        data_wait += time.perf_counter() - fetch
        if i == 0:
            agree_on_data(failure, d)
        x = batch["latent"].to(d.device, non_blocking=True)
        y = batch["label"].to(d.device, non_blocking=True)
        targets = alignment_targets(batch, encoder, d.device)
        positions = batch["position"] if "position" in batch else default_positions(d, p, i, len(y))
        last = i == p.grad_accum - 1
        sync = contextlib.nullcontext() if (last or not d.enabled) else net.no_sync()
        with sync, torch.autocast(d.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, logs = objective(net, x, y, targets, state.step, draws.at(positions))
        state.scaler.scale(loss / p.grad_accum).backward()
        for key, value in {"loss": loss.detach(), **logs}.items():
            share = value.detach().float() / p.grad_accum
            logs_sum[key] = logs_sum[key] + share if key in logs_sum else share
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trainable, p.grad_clip if p.grad_clip > 0 else math.inf)
    # With fp16 the grad scaler skips overflowing steps itself; only a non-finite loss counts then.
    if state.scaler.is_enabled():
        skipped = any_rank(not bool(torch.isfinite(logs_sum["loss"])), d)
    else:
        skipped = not bool(torch.isfinite(grad_norm))
    if skipped:
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.update()
        return StepStats(True, logs_sum, grad_norm, data_wait)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.update_ema(p.ema_decay)
    state.step += 1
    return StepStats(False, logs_sum, grad_norm, data_wait)


def default_positions(d: Dist, p: PhaseConfig, micro: int, n: int) -> torch.Tensor:
    """The global-batch positions of micro-batch `micro` of a batch source that gives none: laid
    out as the shard loader lays them (rank r takes [rG/W, (r+1)G/W), in grad_accum slices)."""
    size = p.batch_size // (d.world_size * p.grad_accum)
    if n > size:
        raise ErwError(
            f"a micro-batch of {n} samples, more than batch_size / (world_size * grad_accum) = {size}: "
            "the batch source does not match the phase's batch settings"
        )
    start = d.rank * (p.batch_size // d.world_size) + micro * size
    return torch.arange(start, start + n)


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
