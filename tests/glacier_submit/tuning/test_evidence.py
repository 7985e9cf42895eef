"""The tuner's evidence: the members' out-of-fold arrays read from beside their checkpoints
(each member's own validation tiles, in the members' order), and --tune oof refused without them."""
import os

import numpy as np
import pytest

from glacier_submit.tuning.evidence import read_member_oof


def test_tune_needs_oof(tiny_members, tmp_path):
    from glacier_submit.bundle import build

    with pytest.raises(ValueError, match="out-of-fold predictions"):
        build(tiny_members, str(tmp_path / "b"), tune="oof", check_size=(64, 64))
    assert not os.path.exists(tmp_path / "b" / "solution.py")


def test_read_member_oof_from_payload_entries(tmp_path):
    rng = np.random.default_rng(0)
    saved, labels = {}, {}
    os.makedirs(tmp_path / "oof" / "labels")
    for name, val in (("fold1_seed0", ["t2"]), ("fold0_seed0", ["t0", "t1"])):
        os.makedirs(tmp_path / "oof" / name)
        for k in val:
            p = rng.random((4, 6, 5)).astype(np.float16)
            np.save(tmp_path / "oof" / name / f"{k}.npy", p)
            saved[(name, k)] = p.astype(np.float32)
            labels[k] = rng.integers(0, 4, (6, 5))
            np.save(tmp_path / "oof" / "labels" / f"{k}.npy", labels[k])
    entries = [{"name": "fold1_seed0", "meta": {"source": str(tmp_path / "fold1_seed0.pt"), "fold": 1,
                                               "val_tiles": ["t2"], "train_tiles": ["t0", "t1"]}},
               {"name": "fold0_seed0", "meta": {"source": str(tmp_path / "fold0_seed0.pt"), "fold": 0,
                                               "val_tiles": ["t0", "t1", "t2"], "train_tiles": ["t2"]}}]
    oof = read_member_oof(entries)
    assert oof.keys == ["t0", "t1", "t2"] and oof.fold_of == {"t0": 0, "t1": 0, "t2": 1}
    assert list(oof.probs) == ["fold1_seed0", "fold0_seed0"]
    assert oof.members_of_fold == {1: ["fold1_seed0"], 0: ["fold0_seed0"]}
    for (name, k), p in saved.items():
        assert np.array_equal(oof.probs[name][k], p)
        assert np.array_equal(oof.labels[k], labels[k])
    assert read_member_oof([{"name": "x", "meta": {"source": str(tmp_path / "none" / "x.pt"), "fold": 0}}]).keys == []


def _entry(method, detail=""):
    grouping = {"method": method, "detail": detail} if method else {}
    return {"name": "m", "meta": {"fold_grouping": grouping}}


@pytest.mark.parametrize("method", ["grid", "georeferencing", "edges"])
def test_spatial_blocks_see_a_shift_across_the_mosaic_not_to_another_region(method):
    from glacier_submit.tuning.evidence import shift_statement

    grouped, line = shift_statement([_entry(method, "5 groups"), _entry(method, "5 groups")])
    assert grouped and line.startswith("evidence: spatially blocked folds") and "5 groups" in line
    assert "not a shift to another region" in line and "--groups FILE" in line


def test_a_groups_file_makes_out_of_group_evidence():
    from glacier_submit.tuning.evidence import shift_statement

    grouped, line = shift_statement([_entry("file", "4 regions")])
    assert grouped and line.startswith("evidence: folds grouped by a groups file") and "4 regions" in line


@pytest.mark.parametrize("entries", [[_entry("none")], [_entry(None)], [_entry("grid"), _entry("none")]])
def test_ungrouped_or_mixed_folds_are_warned_about(entries):
    from glacier_submit.tuning.evidence import shift_statement

    grouped, line = shift_statement(entries)
    assert not grouped and "cannot see a regional shift" in line and "--groups FILE" in line
