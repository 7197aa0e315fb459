"""The data benchmark's pure logic (benchmarks/with_data.py), on synthetic rows and index ranges:
no dataset, no model."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.with_data import (
    NOT_CLEANED_ASR, TARGET_SIZE, by_family, groups, not_cleaned, read_rows, split_indices, summarise, target_checks,
)


def _row(before_asr, after_asr, recal_asr=None, tuned_asr=None, *, acc=90.0, after_acc=89.0, method="data",
         n=TARGET_SIZE, family="badnets", refused=None, model="preact:badnets", error=None):
    backdoored = before_asr is not None
    der = None if not backdoored else 100.0 * (max(0.0, before_asr - after_asr) / 100 - max(0.0, acc - after_acc) / 100
                                               + 1) / 2
    row = {"model": model, "n": n, "method": method, "family": family if backdoored else None,
           "before": {"acc": acc, "asr": before_asr},
           "after": {"acc": after_acc, "asr": after_asr, "der": der},
           "recal": None if recal_asr is None and backdoored else {"acc": after_acc, "asr": recal_asr},
           "tuned": {"acc": after_acc - 1.0, "asr": tuned_asr if backdoored else None},
           "seconds": 2.0, "refused": refused, "unchanged": refused is not None}
    if error:
        row["error"] = error
    return row


def test_split_avoids_the_excluded_images_and_is_disjoint_and_nested():
    exclude = np.arange(0, 100, 3)
    robust, sets = split_indices(100, exclude, (5, 20, 36), 30, seed=1)
    assert len(robust) == 30 and len(set(robust)) == 30
    assert not set(robust) & set(exclude)
    assert [len(sets[n]) for n in (5, 20, 36)] == [5, 20, 36]  # 30 + 36 = all 66 free
    assert not set(sets[36]) & set(exclude) and not set(sets[36]) & set(robust)
    assert list(sets[5]) == list(sets[20][:5]) and list(sets[20]) == list(sets[36][:20])
    again, same = split_indices(100, exclude, (5, 20, 36), 30, seed=1)
    assert np.array_equal(again, robust) and np.array_equal(same[36], sets[36])
    other, _ = split_indices(100, exclude, (5, 20, 36), 30, seed=2)
    with pytest.raises(ValueError):
        split_indices(100, exclude, (37,), 30)
    assert not np.array_equal(other, robust)


def test_split_refuses_more_images_than_there_are():
    with pytest.raises(ValueError):
        split_indices(50, np.arange(10), (20,), 21)
    robust, sets = split_indices(50, np.arange(10), (20,), 20)
    assert len(set(robust) | set(sets[20])) == 40


def test_not_cleaned_rule():
    assert not not_cleaned(_row(99.0, 1.0, 2.0, 3.0))
    assert not_cleaned(_row(99.0, NOT_CLEANED_ASR + 0.1, 2.0, 3.0))  # after clean
    assert not_cleaned(_row(99.0, 1.0, 95.0, 3.0))  # masked: comes back under (a)
    assert not_cleaned(_row(99.0, 1.0, 2.0, 34.0))  # comes back under (b)
    assert not not_cleaned(_row(99.0, NOT_CLEANED_ASR, None, NOT_CLEANED_ASR))  # 10 is not above 10; (a) n/a
    assert not not_cleaned(_row(None, None, acc=90.0, after_acc=80.0))  # a clean control is never counted


def test_summary_maths():
    rows = [_row(100.0, 0.0, 2.0, 4.0, acc=90.0, after_acc=88.0),
            _row(98.0, 20.0, None, 6.0, acc=80.0, after_acc=80.0, family="wanet", model="vgg:wanet"),
            _row(None, None, acc=90.0, after_acc=89.5, model="preact:clean"),
            _row(None, None, acc=85.0, after_acc=83.0, model="vgg:clean", refused="FidelityBudgetError: x")]
    s = summarise(rows)
    assert s["mean_asr"] == pytest.approx(10.0) and s["worst_asr"] == 20.0
    assert s["mean_acc_drop"] == pytest.approx(1.0)
    assert s["mean_der"] == pytest.approx((99.0 + 89.0) / 2)
    assert s["mean_asr_recal"] == pytest.approx(2.0) and s["recal_models"] == 1  # n/a is left out, not zero
    assert s["mean_asr_tuned"] == pytest.approx(5.0)
    assert s["not_cleaned"] == 1 and s["backdoored"] == 2 and s["clean_models"] == 2
    assert s["clean_mean_acc_drop"] == pytest.approx(1.25) and s["clean_worst_acc_drop"] == pytest.approx(2.0)
    assert s["refused"] == 1 and s["errors"] == 0
    checks = {name: ok for name, _, ok in target_checks(s)}
    assert checks["mean ACC drop <= 2"] is True and checks["mean ASR <= 3"] is False
    assert checks["mean ASR after (a) <= 5"] is True and checks["clean controls: worst ACC drop <= 1"] is False


def test_error_rows_are_counted_but_not_averaged():
    rows = [_row(100.0, 0.0, 0.0, 0.0), _row(100.0, 100.0, error="RuntimeError: boom")]
    s = summarise(rows)
    assert s["errors"] == 1 and s["mean_asr"] == 0.0 and s["backdoored"] == 1


def test_families_and_groups():
    rows = [_row(100.0, 0.0, method="finetune", n=50), _row(100.0, 50.0, family="sig"),
            _row(100.0, 10.0, family="sig"), _row(100.0, 90.0, method="default", n=0)]
    grouped = groups(rows)
    assert list(grouped) == [("default", 0), ("data", TARGET_SIZE), ("finetune", 50)]
    fam = by_family(grouped[("data", TARGET_SIZE)])
    assert fam["sig"]["asr"] == pytest.approx(30.0) and fam["sig"]["models"] == 2
    assert fam["badnets"]["models"] == 0 and fam["badnets"]["asr"] is None


def test_resume_file_keeps_finished_rows_and_drops_errors(tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    rows = [_row(100.0, 5.0), _row(100.0, 5.0, method="finetune", error="E: x"), _row(100.0, 1.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = read_rows(path)
    assert len(kept) == 1 and kept[0]["after"]["asr"] == 1.0  # the last copy of a key wins
    assert read_rows(tmp_path / "missing.jsonl") == []
