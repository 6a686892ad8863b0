"""Every random stream of training, and what it is keyed by.

Each is a function of numbers a resumed run knows, so resuming draws exactly what the
uninterrupted run drew:

- the initial weights: (seed), the same on every rank (`init_seed`);
- the objective's per-sample draws (the noise, the time t, the label drop): (seed, step,
  position), position being the sample's place in the step's global batch (0..G-1, given by
  the shard loader). They do not depend on the number of ranks, the micro-batches or
  grad_accum, so a run resumed on another world size draws for every sample what the
  uninterrupted run drew (`StepDraws`);
- the global RNG during a step: (seed, rank, step) (`step_seed`), for anything that is not keyed
  per sample (nothing in the shipped models and objectives draws from it).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

# Recorded in every checkpoint (state.pt "draws"), so a resume can say when its draws changed.
# 1 (none recorded): the objective drew from the (seed, rank, step) global RNG; 2: (seed, step, position).
VERSION = 2
_STEP_STREAMS, _INIT_STREAM, _SAMPLE_STREAMS = 0, 1, 2  # domains of the hash
# The objective's per-sample streams; a stream's place here is part of its seed (append only).
SAMPLE_STREAMS = ("noise", "time", "label_drop")


def _hashed_seed(*words: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the global RNG for one step of one rank.

    A hash, not arithmetic (the old seed*1000003 + rank*7919 + step gave rank r at step s the
    draws of rank r+1 at step s-7919): every (seed, rank, step) gets its own stream."""
    return _hashed_seed(seed, _STEP_STREAMS, rank, step)


def init_seed(seed: int) -> int:
    """The seed of the initial weights: the same on every rank, apart from every step's stream."""
    return _hashed_seed(seed, _INIT_STREAM)


def sample_stream_seed(seed: int, step: int, stream: str) -> int:
    """The seed of one per-sample stream of one step: the table of the whole global batch."""
    return _hashed_seed(seed, _SAMPLE_STREAMS, step, SAMPLE_STREAMS.index(stream))


class SampleDraws(Protocol):
    """What an objective draws per sample of its batch, by stream name: [n, *shape] tensors."""

    def normal(self, stream: str, shape: tuple[int, ...] = ()) -> Tensor: ...

    def uniform(self, stream: str) -> Tensor: ...


class StepDraws:
    """The per-sample random numbers of one optimizer step.

    Each stream is one table over the whole global batch, [G, *shape], drawn on `device` from a
    generator seeded by (seed, step, stream); a micro-batch takes the rows at its samples'
    positions (`at`). Every rank draws the whole table, once per step and stream (the step's
    micro-batches share it): G times the per-sample draws, e.g. for a global batch of 256
    latents of 4x32x32, 1M normals (4 MiB) of noise and 2 x 256 uniforms per step."""

    def __init__(self, seed: int, step: int, global_batch: int, device: torch.device | str):
        self.seed, self.step, self.global_batch, self.device = seed, step, global_batch, torch.device(device)
        self._tables: dict[str, tuple[str, tuple[int, ...], Tensor]] = {}

    def table(self, stream: str, kind: str, shape: tuple[int, ...] = ()) -> Tensor:
        """The stream's [G, *shape] table of `kind` ("normal" or "uniform") draws."""
        if stream in self._tables:
            drawn_kind, drawn_shape, table = self._tables[stream]
            if (drawn_kind, drawn_shape) != (kind, tuple(shape)):
                raise ValueError(
                    f"stream {stream!r} was drawn as {drawn_kind} {drawn_shape} this step, now asked "
                    f"as {kind} {tuple(shape)}: give each use its own stream"
                )
            return table
        generator = torch.Generator(device=self.device).manual_seed(sample_stream_seed(self.seed, self.step, stream))
        draw = {"normal": torch.randn, "uniform": torch.rand}[kind]
        table = draw((self.global_batch, *shape), generator=generator, device=self.device)
        self._tables[stream] = (kind, tuple(shape), table)
        return table

    def at(self, positions: Tensor) -> "PositionDraws":
        """The draws of the samples at `positions` (int64 [n], 0..G-1) of the global batch."""
        return PositionDraws(self, positions.to(self.device, non_blocking=True))


class PositionDraws:
    """A micro-batch's per-sample draws: rows `positions` of the step's tables."""

    def __init__(self, step_draws: StepDraws, positions: Tensor):
        self.step_draws, self.positions = step_draws, positions

    def normal(self, stream: str, shape: tuple[int, ...] = ()) -> Tensor:
        return self.step_draws.table(stream, "normal", tuple(shape))[self.positions]

    def uniform(self, stream: str) -> Tensor:
        return self.step_draws.table(stream, "uniform")[self.positions]


class GeneratorDraws:
    """Draws in call order from one generator (None: the global RNG), for a batch of n samples on
    `device`: the objective's default outside the trainer. Not keyed per sample: the draws of a
    sample depend on the batch it is in."""

    def __init__(self, n: int, device: torch.device | str, generator: torch.Generator | None = None):
        self.n, self.device, self.generator = n, torch.device(device), generator

    def _draw(self, fn, shape: tuple[int, ...]) -> Tensor:
        on = self.generator.device if self.generator is not None else self.device  # a generator feeds its own device
        return fn((self.n, *shape), generator=self.generator, device=on).to(self.device)

    def normal(self, stream: str, shape: tuple[int, ...] = ()) -> Tensor:
        return self._draw(torch.randn, tuple(shape))

    def uniform(self, stream: str) -> Tensor:
        return self._draw(torch.rand, ())
