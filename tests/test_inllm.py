"""Golden tests of the in-LLM selection rules and schedules (``vtc.inllm``), each value derived by hand from the
papers' rules (../shared/specs/in_llm_compressors.md)."""

import pytest
import torch

from vtc.inllm import (Stage, average_tokens, dart_counts, dart_select, fastv_schedule, pdrop_average,
                       pdrop_schedule, sparsevlm_raters, sparsevlm_schedule, sparsevlm_scores, top_scores,
                       validate_schedule)


def test_average_tokens_per_layer():
    # FastV K=2 keeping 64 of 576 on 32 layers: (2 * 576 + 30 * 64) / 32 = 96
    assert average_tokens([Stage(2, 64)], 576, 32) == 96.0
    assert average_tokens([Stage(8, 288), Stage(16, 144), Stage(24, 72)], 576, 32) == 270.0


@pytest.mark.parametrize("budget, keep", [(192, 166), (128, 98), (64, 30)])
def test_fastv_equivalent_budget_solves_the_count_after_k(budget, keep):
    # k = round((B * 32 - 2 * 576) / 30): 166.4, 98.1, 29.9
    assert fastv_schedule(576, 32, budget, mode="equivalent") == (Stage(2, keep),)


def test_fastv_kept_budget_and_bad_requests():
    assert fastv_schedule(576, 32, 64) == (Stage(2, 64),)
    assert fastv_schedule(576, 32, 1000) == (Stage(2, 576),)
    with pytest.raises(ValueError, match="below the 36.0"):
        fastv_schedule(576, 32, 30, mode="equivalent")  # 2 full layers already average 2 * 576 / 32 = 36
    with pytest.raises(ValueError, match="outside 1..31"):
        fastv_schedule(576, 32, 64, layer=32)
    with pytest.raises(ValueError, match="unknown budget mode"):
        fastv_schedule(576, 32, 64, mode="flops")


def test_pdrop_official_default_is_270_tokens():
    stages = pdrop_schedule(576, 32, ratio=0.5)
    assert stages == (Stage(8, 288), Stage(16, 144), Stage(24, 72))
    assert pdrop_average(0.5, (8, 16, 24), 576, 32) == 270.0


@pytest.mark.parametrize("budget, layers, ratio", [(192, (8, 16, 24), 0.253), (128, (2, 8, 16), 0.42),
                                                   (64, (2, 8, 16), 0.19)])
def test_pdrop_budget_solves_lambda_as_the_authors_suggest(budget, layers, ratio):
    stages = pdrop_schedule(576, 32, budget)
    assert tuple(s.layer for s in stages) == layers
    solved = stages[0].keep / 576
    assert solved == pytest.approx(ratio, abs=0.01)
    assert abs(average_tokens(stages, 576, 32) - budget) < 1.5  # counts are truncated to ints
    with pytest.raises(ValueError, match="either a budget"):
        pdrop_schedule(576, 32, 64, ratio=0.5)


def test_pdrop_out_of_reach_budget_names_the_range():
    with pytest.raises(ValueError, match="out of PyramidDrop's reach"):
        pdrop_schedule(576, 32, 20)  # (2, 8, 16) with lambda = 0 already averages 2 * 576 / 32 = 36


def test_sparsevlm_table_rows_start_after_the_pruning_layer():
    stages = sparsevlm_schedule(576, 32, 192)
    assert stages == (Stage(3, 300), Stage(7, 200), Stage(16, 110))
    # 3 * 576 + 4 * 300 + 9 * 200 + 16 * 110 = 6488 -> 202.75 tokens per layer (the spec's count)
    assert average_tokens(stages, 576, 32) == 202.75
    # 1152 tokens: the budget names the row, whose counts scale by 2
    assert sparsevlm_schedule(1152, 32, 128) == (Stage(3, 606), Stage(7, 220), Stage(16, 72))
    with pytest.raises(ValueError, match="budgets 192, 128, 96, 64"):
        sparsevlm_schedule(576, 32, 300)


def test_top_scores_keeps_the_highest_in_order_ties_to_the_lower_index():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2])
    assert top_scores(scores, 2).tolist() == [1, 2]
    assert top_scores(scores, 1).tolist() == [1]
    assert top_scores(scores, 0).tolist() == []
    with pytest.raises(ValueError):
        top_scores(scores, 5)


def test_sparsevlm_raters_and_scores_by_hand():
    # one visual token (1, 0); text tokens (1, 0), (0, 1), (0, 0): logits 1, 0, 0 -> softmax e/(e+2) = 0.58 and
    # 0.21 twice; the mean is 1/3, so only the first text token rates
    raters = sparsevlm_raters(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert raters.tolist() == [True, False, False]
    # two heads, two raters, three visual tokens: head mean then rater mean
    attention = torch.tensor([[[0.2, 0.4, 0.0], [0.0, 0.2, 0.2]], [[0.0, 0.0, 0.4], [0.4, 0.2, 0.2]]])
    assert torch.allclose(sparsevlm_scores(attention), torch.tensor([0.15, 0.2, 0.2]))


def test_dart_counts():
    # 64 tokens, 4 image + 4 text pivots: 60 to select, 7 per pivot, the last takes the remaining 4 as well
    assert dart_counts(64) == [7, 7, 7, 7, 7, 7, 7, 11]
    # the reference script: budget // 8 per pivot -> 4 + 8 * 16 = 132 visual tokens for "128"
    assert dart_counts(128, mode="official") == [16] * 8


def test_dart_select_by_hand():
    # key L1 norms 1, 5, 2, 3, 0.5, 4 -> image pivot 1; text norms 1, 9 -> text pivot 1
    visual_keys = torch.tensor([[1.0], [5.0], [2.0], [3.0], [0.5], [4.0]])
    text_keys = torch.tensor([[1.0], [-9.0]])
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.1]])
    text_hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # budget 4 = 1 pivot + 3: counts [1, 2]. Pivot (1, 0): cosines of 0, 2, 3, 4, 5 are 1, 0, .71, -1, .995 ->
    # takes 4. Text pivot (0, 1): cosines of 0, 2, 3, 5 are 0, 1, .71, .0995 -> takes 0 and 5.
    kept = dart_select(visual_keys, text_keys, hidden, text_hidden, budget=4, image_pivots=1, text_pivots=1)
    assert kept.tolist() == [0, 1, 4, 5]
    # a budget below the image pivots keeps the strongest pivots only
    assert dart_select(visual_keys, text_keys, hidden, text_hidden, budget=1, image_pivots=2,
                       text_pivots=1).tolist() == [1]
    assert dart_select(visual_keys, text_keys, hidden, text_hidden, budget=6, image_pivots=1,
                       text_pivots=1).tolist() == list(range(6))


def test_schedules_are_validated():
    with pytest.raises(ValueError, match="must increase"):
        validate_schedule([Stage(4, 10), Stage(4, 5)], 20, 8)
    with pytest.raises(ValueError, match="never grow"):
        validate_schedule([Stage(2, 10), Stage(4, 12)], 20, 8)
    with pytest.raises(ValueError, match="outside 1..7"):
        validate_schedule([Stage(0, 10)], 20, 8)
