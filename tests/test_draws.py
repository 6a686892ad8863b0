"""Per-sample random draws keyed by (seed, step, position in the global batch): the same for a
sample however the global batch is split over ranks and micro-batches (elastic resumption)."""

from __future__ import annotations

import pytest
import torch

from erw.config import ModelConfig, ObjectiveConfig, PhaseConfig
from erw.models.sit import build_sit
from erw.objectives import DiffusionObjective
from erw.training.distributed import Dist
from erw.draws import GeneratorDraws, StepDraws
from erw.training.step import default_positions

G = 8  # global batch
SPLITS = {  # the positions each micro-batch holds: one rank, 2 ranks, 4 ranks x grad_accum 2, bad samples dropped
    "1 rank": [range(0, 8)],
    "2 ranks": [range(0, 4), range(4, 8)],
    "4 ranks x 2 micro-batches": [range(i, i + 1) for i in range(8)],
    "samples dropped": [[0, 2, 3], [5, 7]],
}


def rows(split, stream_draw):
    """Every micro-batch of `split` drawn by its own StepDraws (as another rank would), stacked."""
    return torch.cat([stream_draw(StepDraws(7, 3, G, "cpu").at(torch.tensor(list(p)))) for p in split])


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
def test_a_samples_draws_do_not_depend_on_how_the_global_batch_is_split(split):
    where = torch.tensor([p for micro in SPLITS[split] for p in micro])
    for draw in (
        lambda d: d.normal("noise", (4, 2, 2)),
        lambda d: d.uniform("time"),
        lambda d: d.normal("time"),
        lambda d: d.uniform("label_drop"),
    ):
        whole = draw(StepDraws(7, 3, G, "cpu").at(torch.arange(G)))
        assert torch.equal(rows(SPLITS[split], draw), whole[where])  # bit for bit


def test_draws_differ_across_steps_seeds_and_streams():
    def table(seed, step, stream):
        return StepDraws(seed, step, G, "cpu").table(stream, "uniform")

    tables = [
        table(0, 0, "time"),
        table(0, 1, "time"),
        table(1, 0, "time"),
        table(0, 0, "label_drop"),
        table(0, 0, "noise"),
    ]
    for i, a in enumerate(tables):
        for b in tables[i + 1 :]:
            assert not torch.equal(a, b)
    assert torch.equal(table(0, 5, "time"), table(0, 5, "time"))  # a function of (seed, step, stream): resumable


def test_a_stream_drawn_twice_in_a_step_with_another_shape_is_refused():
    draws = StepDraws(0, 0, G, "cpu")
    draws.table("noise", "normal", (4, 2, 2))
    assert draws.table("noise", "normal", (4, 2, 2)) is draws.table("noise", "normal", (4, 2, 2))  # drawn once a step
    with pytest.raises(ValueError, match="its own stream"):
        draws.table("noise", "normal", (3, 2, 2))


def test_the_objective_on_split_batches_equals_it_on_the_whole_batch():
    """A SiT with a label drop of 0.5, a step's global batch of 8 once whole and once in the
    micro-batches of 2 ranks x 2: the per-sample losses agree, so the mean loss (what DDP's
    averaged gradient follows) agrees within float tolerance; global-RNG draws do not."""
    torch.manual_seed(0)
    model = build_sit(
        "SiT-S/2",
        input_size=4,
        depth=2,
        hidden_size=32,
        num_heads=2,
        num_classes=10,
        class_dropout=0.5,
        projector_dim=16,
    ).train()
    objective = DiffusionObjective(ObjectiveConfig(time_sampling="lognormal"), ModelConfig(arch="SiT-S/2"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(G, 4, 4, 4, generator=g), torch.randint(0, 10, (G,), generator=g)

    def loss(micro_batches, keyed=True):
        total = 0.0
        for p in micro_batches:
            p = torch.tensor(list(p))
            draws = StepDraws(3, 11, G, "cpu").at(p) if keyed else GeneratorDraws(len(p), "cpu")
            total += objective(model, x[p], y[p], None, 11, draws)[0].detach() * len(p) / G
        return total

    whole = loss([range(G)])
    torch.testing.assert_close(loss([range(0, 2), range(2, 4), range(4, 6), range(6, 8)]), whole, rtol=1e-6, atol=0)
    torch.manual_seed(2)
    assert abs(float(loss([range(0, 4), range(4, 8)], keyed=False)) - float(whole)) > 1e-3


def test_label_drop_follows_the_draws():
    model = build_sit(
        "SiT-S/2", input_size=4, depth=1, hidden_size=32, num_heads=2, num_classes=10, class_dropout=0.3
    ).train()
    labels = torch.arange(6)
    u = torch.tensor([0.0, 0.29, 0.3, 0.5, 0.1, 0.99])
    got = model.y_embedder(labels, u)
    want = model.y_embedder.embedding_table(torch.tensor([10, 10, 2, 3, 10, 5]))
    assert torch.equal(got, want)


def test_default_positions_lay_the_global_batch_out_as_the_shard_loader():
    """Rank r of W takes [rG/W, (r+1)G/W), in grad_accum slices (erw/data/loader.py)."""
    p = PhaseConfig(batch_size=8, grad_accum=2)
    rank1 = Dist(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
    assert default_positions(rank1, p, 0, 2).tolist() == [4, 5]
    assert default_positions(rank1, p, 1, 2).tolist() == [6, 7]
    with pytest.raises(Exception, match="does not match the phase's batch settings"):
        default_positions(rank1, p, 0, 3)
