"""The method's stages in isolation: NWC, ranking, pruning, OT fusion and channel ties."""

import numpy as np
import pytest
import torch

from otbr_onnx import fuse, nwc, prune
from otbr_onnx.layers import find_weight_layers
from otbr_onnx.ties import FOLLOWER, analyse
from tests import builders


def test_nwc_is_the_l1_change_of_each_neuron():
    before = np.zeros((3, 2, 2, 2), dtype=np.float32)
    after = before.copy()
    after[1, 0, 0, 0], after[1, 1, 1, 1], after[2] = 0.5, -0.25, 0.1
    np.testing.assert_allclose(nwc.neuron_weight_change(before, after), [0.0, 0.75, 0.8], rtol=1e-6)


def test_global_ranking_orders_across_layers_and_is_deterministic_on_ties():
    ranking = nwc.global_ranking({0: np.array([0.1, 0.9, 0.5]), 1: np.array([0.5, 2.0])})
    assert ranking == [(1, 1), (0, 1), (0, 2), (1, 0), (0, 0)]


def test_mean_scale_ranks_by_change_per_weight_not_by_layer_size():
    wide, narrow = np.array([9.0, 8.0]), np.array([1.0, 0.5])  # fan-in 90 and 2
    by_sum = nwc.global_ranking({0: wide, 1: narrow})
    by_mean = nwc.global_ranking({0: nwc.scaled_for_ranking(wide, 90, "mean"),
                                  1: nwc.scaled_for_ranking(narrow, 2, "mean")})
    assert by_sum[:2] == [(0, 0), (0, 1)] and by_mean[:2] == [(1, 0), (1, 1)]
    assert nwc.scaled_for_ranking(wide, 90, "sum") is wide
    with pytest.raises(ValueError):
        nwc.scaled_for_ranking(wide, 90, "max")


def test_select_pruned_takes_floor_of_ratio_and_never_empties_a_layer():
    ranking = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (0, 2)]
    masks = prune.select_pruned(ranking, {0: 2, 1: 4}, ratio=0.5)  # floor(0.5 * 6) = 3
    assert masks[0].tolist() == [True, False]  # (0, 1) skipped: it would empty layer 0
    assert masks[1].tolist() == [True, True, False, False]
    assert sum(int(m.sum()) for m in masks.values()) == 3
    assert not any(m.any() for m in prune.select_pruned(ranking, {0: 2, 1: 4}, ratio=0.0).values())


def test_prune_rows_zeroes_only_masked_neurons():
    rows = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    out = prune.prune_rows(rows, np.array([False, True, False]))
    assert out[1].tolist() == [0, 0, 0, 0] and np.array_equal(out[[0, 2]], rows[[0, 2]])
    assert rows[1, 0] == 5  # the input is not modified


def test_marginal_survives_dead_neurons():
    q = fuse.marginal(np.array([0.0, 0.0, 2.0, 1.0]))
    assert np.all(q > 0) and np.isclose(q.sum(), 1.0) and q[2] > q[3] > q[0]
    assert np.allclose(fuse.marginal(np.zeros(4)), 0.25)


def test_alignment_columns_are_convex_combinations():
    rng = np.random.default_rng(0)
    cost = rng.random((5, 5))
    plan = fuse.transport_plan(cost, fuse.marginal(rng.random(5)))
    A = fuse.alignment(plan)
    assert np.all(A >= 0)
    np.testing.assert_allclose(A.sum(axis=0), 1.0, atol=1e-9)


def test_transport_with_uniform_marginals_finds_the_permutation():
    rng = np.random.default_rng(1)
    wb = rng.normal(size=(6, 4))
    perm = rng.permutation(6)
    wp = wb[perm]  # pruned model = backdoored model with neurons reordered
    A = fuse.alignment(fuse.transport_plan(np.linalg.norm(wp[:, None] - wb[None], axis=2), np.full(6, 1 / 6)))
    np.testing.assert_allclose(fuse.transport(fuse.Neurons(wp), A).rows, wb, atol=1e-12)


def test_group_alignment_does_not_depend_on_the_order_of_identical_rows():
    """Pruned neurons are all-zero rows, so their costs are equal and EMD picks among them by
    neuron order; ``fuse.symmetrise`` averages the plan over identical rows. Without it the
    next layer's input alignment, hence the cleaned function, would depend on how the input
    model happened to order its neurons (tests/test_coverage.py's permutation tests)."""
    rows = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    q = [np.array([1.0, 2.0, 3.0])]
    plan = fuse.group_alignment([fuse.Neurons(rows)], [fuse.Neurons(rows[::-1].copy())], q)
    np.testing.assert_allclose(plan[0], plan[1], atol=1e-12)  # the two zero rows: one alignment
    np.testing.assert_allclose(plan.sum(axis=0), 1.0, atol=1e-9)


@pytest.mark.parametrize("kind, permute", [
    ("chain", builders.permute_chain_hidden),
    ("preact", builders.permute_preact_stream),
])
def test_fusion_of_a_reordered_copy_gives_back_the_model(kind, permute):
    """Fuse (lambda 1) a channel-permuted copy of the model into the model, with uniform NWC.

    OT then finds the permutation and every layer, including those reading a residual
    stream written by two tied layers, must come back exactly. A plan carried to the wrong
    layer, or a tie ignored, leaves misaligned weights and fails this test.
    """
    torch_model, original = builders.build(kind)
    width = torch_model.c1.out_channels if kind == "chain" else torch_model.stem.out_channels
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(3))
    permuted = builders.export(permute(torch_model, perm), (1, 1, 8, 8))
    layers, _ = find_weight_layers(original)
    backdoored, reordered = builders.weight_neurons(original, layers), builders.weight_neurons(permuted, layers)
    ties = analyse(original, layers, "input", (1, 1, 8, 8))
    fused_set = {i for i in range(len(layers)) if i not in ties.heads}
    uniform = {i: np.ones(layer.out_channels) for i, layer in enumerate(layers) if ties.roles[i] != FOLLOWER}
    fused, record = fuse.fuse(ties, backdoored, reordered, uniform, 1.0, fused_set)
    assert record.fused and "ot" in record.plans.values()
    for i in fused_set:
        np.testing.assert_allclose(fused[i].rows, backdoored[i].rows, atol=1e-5, err_msg=layers[i].label)
    assert not np.allclose(reordered[0].rows, backdoored[0].rows)  # the copy really was reordered


def test_residual_add_ties_the_layers_that_write_the_stream():
    _, model = builders.build("preact")
    layers, _ = find_weight_layers(model)
    ties = analyse(model, layers, "input", (1, 1, 8, 8))
    labels = {layer.label: i for i, layer in enumerate(layers)}
    stem, b1c2 = labels["/stem/Conv"], labels["/b1/c2/Conv"]
    sc, b2c2, b1c1 = labels["/b2/sc/Conv"], labels["/b2/c2/Conv"], labels["/b1/c1/Conv"]
    assert ties.groups[stem] == ties.groups[b1c2]
    assert ties.groups[sc] == ties.groups[b2c2]
    assert ties.groups[b1c1] not in (ties.groups[stem], ties.groups[sc])
    head = labels["/fc/Gemm"]
    assert head in ties.heads and ties.roles[head] == "pinned"


def test_unlearning_ascent_is_bounded_and_moves_every_weight_layer():
    from converters.to_torch import convert, weight_refs
    from otbr_onnx.unlearn import UnlearnConfig, random_unlearning

    _, model = builders.build("chain")
    layers, _ = find_weight_layers(model)
    module = convert(model)
    refs = {layer.weight: ref for layer in layers for name, ref in weight_refs(module, model, layers).items()
            if name == layer.weight}
    before = {name: ref.read(module) for name, ref in refs.items()}
    after, log = random_unlearning(module, refs, (1, 1, 8, 8), 4, 0, False,
                                   UnlearnConfig(iterations=30, batch_size=8, lr=50.0, max_loss=20.0))
    assert log.stopped_early and "cap" in log.stopped_early
    assert all(np.all(np.isfinite(v)) for v in after.values())
    assert all(not np.array_equal(before[n], after[n]) for n in refs)
    assert all(np.array_equal(before[n], refs[n].read(module)) for n in refs)  # the input module is untouched


def test_micro_batches_accumulate_the_same_gradient_without_batchnorm():
    """On a BN-free model, chunking the noise batch changes memory, not the unlearned weights."""
    from converters.to_torch import convert, weight_refs
    from otbr_onnx.unlearn import UnlearnConfig, random_unlearning

    _, model = builders.build("chain")
    layers, _ = find_weight_layers(model)
    module = convert(model)
    refs = weight_refs(module, model, layers)
    config = UnlearnConfig(iterations=3, batch_size=12, lr=1e-2)
    whole, _ = random_unlearning(module, refs, (1, 1, 8, 8), 4, 0, False, config)
    chunked, _ = random_unlearning(module, refs, (1, 1, 8, 8), 4, 0, False,
                                   UnlearnConfig(iterations=3, batch_size=12, lr=1e-2, micro_batch=5))
    for name in refs:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(whole[n], refs[n].read(module)) for n in refs)


@pytest.mark.parametrize("kind, same", [("chain", True), ("preact", False)])
def test_batchnorm_mode_during_unlearning_matters_only_where_bn_remains(kind, same):
    """unlearn_bn="eval" normalises noise with the running statistics instead of the batch's:
    a BN-free graph unlearns identically either way, a PreAct graph (BN kept) does not."""
    from converters.to_torch import convert, weight_refs
    from otbr_onnx.unlearn import UnlearnConfig, random_unlearning

    _, model = builders.build(kind)
    layers, _ = find_weight_layers(model)
    module = convert(model)
    refs = weight_refs(module, model, layers)
    runs = [random_unlearning(module, refs, (1, 1, 8, 8), 4, 0, False,
                              UnlearnConfig(iterations=3, batch_size=12, lr=1e-2, train_mode=mode))[0]
            for mode in (True, False)]
    assert all(np.allclose(runs[0][n], runs[1][n], rtol=1e-5, atol=1e-7) for n in refs) == same
