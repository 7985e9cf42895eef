"""The weights folder of a run: every path named in one place, and the one reader of the
out-of-fold arrays (only each member's validation tiles that are not among its training tiles,
labels required unless ``labels=False``, members in the order given), checked against files
written here with numpy."""
import os

import numpy as np

from training.rundir import OOFMember, RunDir, fold_members, member_name, parse_member, read_oof


def test_paths():
    r = RunDir("/runs/w")
    assert member_name(3, 1) == "fold3_seed1"
    assert r.member(3, 1) == "/runs/w/fold3_seed1.pt"
    assert r.oof_root == "/runs/w/oof" and r.oof_dir("fold3_seed1") == "/runs/w/oof/fold3_seed1"
    assert r.oof_file("fold3_seed1", "02_07") == "/runs/w/oof/fold3_seed1/02_07.npy"
    assert r.labels_dir == "/runs/w/oof/labels" and r.label_file("02_07") == "/runs/w/oof/labels/02_07.npy"
    assert r.log_csv("fold3_seed1") == "/runs/w/logs/fold3_seed1.csv" and r.worker_log(2) == "/runs/w/logs/worker2.log"
    assert r.work_dir("fold3_seed1") == "/runs/w/.work/fold3_seed1"
    assert (r.cv_summary_json, r.cv_summary_txt, r.training_log, r.curves_png) == (
        "/runs/w/cv_summary.json", "/runs/w/cv_summary.txt", "/runs/w/training_log.txt", "/runs/w/curves.png")
    assert RunDir.of_member("/runs/w/fold0_seed0.pt") == r


def test_member_names_parsed_and_listed(tmp_path):
    assert parse_member("fold3_seed1.pt") == (3, 1) and parse_member("/x/fold-1_seed0.pt") == (-1, 0)
    assert parse_member("hkh.pt") is None and parse_member("fold3_seed1.pth") is None
    for name in ("fold1_seed0.pt", "fold0_seed1.pt", "fold0_seed0.pt", "hkh.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert RunDir(str(tmp_path)).members() == [(0, 0, str(tmp_path / "fold0_seed0.pt")),
                                               (0, 1, str(tmp_path / "fold0_seed1.pt")),
                                               (1, 0, str(tmp_path / "fold1_seed0.pt"))]
    assert RunDir(str(tmp_path / "missing")).members() == []


def _write(run, name, key, seed):
    p = np.random.default_rng(seed).random((4, 3, 5)).astype(np.float16)
    os.makedirs(run.oof_dir(name), exist_ok=True)
    np.save(run.oof_file(name, key), p)
    return p.astype(np.float32)


def _label(run, key, seed):
    y = np.random.default_rng(100 + seed).integers(0, 4, (3, 5)).astype(np.uint8)
    os.makedirs(run.labels_dir, exist_ok=True)
    np.save(run.label_file(key), y)
    return y


def test_read_oof_takes_only_clean_validation_tiles_with_labels(tmp_path):
    run = RunDir(str(tmp_path))
    saved = {}
    # fold 1 seed 0 (listed first): validates b and c; c is also among its training tiles
    saved[("fold1_seed0", "b")] = _write(run, "fold1_seed0", "b", 1)
    _write(run, "fold1_seed0", "c", 2)
    # fold 0, two seeds: validate a (labelled) and d (no label file)
    saved[("fold0_seed0", "a")] = _write(run, "fold0_seed0", "a", 3)
    saved[("fold0_seed1", "a")] = _write(run, "fold0_seed1", "a", 4)
    saved[("fold0_seed0", "d")] = _write(run, "fold0_seed0", "d", 5)
    labels = {k: _label(run, k, i) for i, k in enumerate("abc")}
    _write(run, "fold0_seed0", "e", 6)  # an array of a tile the member does not validate: never read
    members = [OOFMember(run, "fold1_seed0", 1, ("b", "c"), ("c", "x")),
               OOFMember(run, "fold0_seed0", 0, ("a", "d"), ("b",)),
               OOFMember(run, "fold0_seed1", 0, ("a",), ("b",)),
               OOFMember(run, "fold2_seed0", 2, ("f",))]  # no oof/ folder: not a member of its fold
    oof = read_oof(members)
    assert oof.keys == ["a", "b"]
    assert oof.fold_of == {"a": 0, "b": 1}
    assert oof.members_of_fold == {1: ["fold1_seed0"], 0: ["fold0_seed0", "fold0_seed1"]}
    assert list(oof.probs) == ["fold1_seed0", "fold0_seed0", "fold0_seed1"]  # the order given
    assert sorted(oof.probs["fold0_seed0"]) == ["a"] and sorted(oof.probs["fold1_seed0"]) == ["b"]
    for (name, key), p in saved.items():
        if key in oof.probs.get(name, {}):
            assert oof.probs[name][key].dtype == np.float32 and np.array_equal(oof.probs[name][key], p)
    for k in ("a", "b"):
        assert oof.labels[k].dtype == np.int64 and np.array_equal(oof.labels[k], labels[k])
    np.testing.assert_allclose(oof.mean_probs("a"), (saved[("fold0_seed0", "a")] + saved[("fold0_seed1", "a")]) / 2)
    assert np.array_equal(oof.mean_probs("a", ["fold0_seed1"]), saved[("fold0_seed1", "a")])
    assert oof.mean_probs("zz") is None

    # without labels the label files are not needed (d counts) and none are read
    bare = read_oof(members, labels=False)
    assert bare.keys == ["a", "b", "d"] and bare.labels == {}
    assert np.array_equal(bare.probs["fold0_seed0"]["d"], saved[("fold0_seed0", "d")])


def test_fold_members_and_members_from_files(tmp_path):
    run = RunDir(str(tmp_path))
    folds = {"folds": [{"fold": 0, "val": ["a"], "train": ["b"]}, {"fold": 1, "val": ["b"], "train": ["a"]}]}
    got = fold_members(run, folds, seeds=[1, 0])
    assert [(m.name, m.fold, tuple(m.val_tiles), tuple(m.train_tiles)) for m in got] == [
        ("fold0_seed1", 0, ("a",), ("b",)), ("fold0_seed0", 0, ("a",), ("b",)),
        ("fold1_seed1", 1, ("b",), ("a",)), ("fold1_seed0", 1, ("b",), ("a",))]
    _write(run, "fold3_seed0", "t2", 0)
    _write(run, "fold3_seed0", "t1", 1)
    m = OOFMember.from_folder(run, "fold3_seed0")
    assert (m.fold, tuple(m.val_tiles)) == (3, ("t1", "t2"))
    assert OOFMember.from_folder(run, "other").fold == -1 and OOFMember.from_folder(run, "other").val_tiles == ()
    meta = {"source": str(tmp_path / "fold3_seed0.pt"), "fold": 3, "val_tiles": ["t1"], "train_tiles": None}
    assert OOFMember.from_meta("fold3_seed0", meta) == OOFMember(run, "fold3_seed0", 3, ("t1",), ())


def test_write_oof_then_prune_and_remove(tmp_path):
    run = RunDir(str(tmp_path))
    probs = {"a": np.full((4, 2, 2), 0.25, np.float16), "b": np.full((4, 2, 2), 0.5, np.float16)}
    labels = {"a": np.zeros((2, 2), np.uint8), "b": np.ones((2, 2), np.uint8)}
    run.write_oof("fold0_seed0", probs, labels)
    run.write_oof("fold1_seed0", {"a": probs["a"]}, labels)
    assert np.array_equal(np.load(run.oof_file("fold0_seed0", "b")), probs["b"])
    assert np.array_equal(np.load(run.label_file("b")), labels["b"])
    assert sorted(os.listdir(run.oof_dir("fold0_seed0"))) == ["a.npy", "b.npy"]  # no temporary file left
    assert run.oof_members() == ["fold0_seed0", "fold1_seed0"]
    (tmp_path / "fold0_seed0.pt").write_bytes(b"")  # only fold 0's member is present
    removed = run.prune_oof(["a"])
    assert sorted(removed) == sorted([run.oof_dir("fold1_seed0"), run.label_file("b")])
    assert run.oof_members() == ["fold0_seed0"] and os.listdir(run.labels_dir) == ["a.npy"]

    os.makedirs(run.work_dir("fold0_seed0"))
    (tmp_path / "fold0_seed1.pt").write_bytes(b"")
    os.makedirs(run.logs_dir)
    open(run.log_csv("fold0_seed0"), "w").close()
    run.remove_member(0, 0)
    assert not os.path.exists(run.member(0, 0)) and not os.path.exists(run.oof_dir("fold0_seed0"))
    assert not os.path.exists(run.work_dir("fold0_seed0")) and not os.path.exists(run.log_csv("fold0_seed0"))
    assert os.path.exists(run.member(0, 1)) and os.listdir(run.labels_dir) == ["a.npy"]
    run.remove_member(5, 5)  # nothing there: nothing to do
    assert RunDir(str(tmp_path / "none")).prune_oof(["a"]) == []
