"""Finished members in --out are reused only when they belong to this run (same fold tiles, same
config); others stop the run naming the difference, or go with --force-retrain."""
import json
import os
import subprocess

import pytest

from training.runs.members import config_differences

from tests.helpers import ROOT, cv_cmd_any_fold, repo_env


def test_member_from_other_folds_stops_the_run(synth_data, folds_file, tmp_path):
    """A finished member trained on other tiles is not "done already": the run stops and
    names the difference (the old code reused it and mixed it into the OOF score)."""
    from tests.helpers import make_member

    out = tmp_path / "w"
    out.mkdir()
    make_member(str(out / "fold0_seed0.pt"), fold=0, train_tiles=["00_00"], val_tiles=["00_01"])
    r = subprocess.run(cv_cmd_any_fold(os.path.join(synth_data, "train"), folds_file, str(out), "--fold", "0"),
                       env=repo_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "fold0_seed0.pt" in r.stderr and "training tiles differ" in r.stderr and "--force-retrain" in r.stderr
    assert "done already" not in r.stdout


def test_force_retrain_removes_stale_members_and_their_oof(tmp_path, folds_file):
    from tests.helpers import make_member
    from training.config import load_config
    from training.rundir import RunDir
    from training.runs.members import resolve_members, stale_members
    from training.runs.run import CvError

    folds = json.load(open(folds_file))
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml")).model_dump()
    f0 = folds["folds"][0]
    good = make_member(str(tmp_path / "fold0_seed0.pt"), fold=0, train_tiles=f0["train"], val_tiles=f0["val"])
    import torch

    ck = torch.load(good, weights_only=True)
    ck["config"] = cfg
    torch.save(ck, good)
    other = dict(ck, config={**cfg, "train": {**cfg["train"], "epochs": 99, "num_workers": 7}})
    torch.save(other, str(tmp_path / "fold0_seed1.pt"))
    torch.save(dict(ck, fold=9), str(tmp_path / "fold9_seed0.pt"))
    for name in ("fold0_seed0", "fold0_seed1", "fold9_seed0", "fold1_seed0"):
        os.makedirs(tmp_path / "oof" / name)
    problems = stale_members(str(tmp_path), folds, folds_file, cfg)
    assert set(problems) == {(0, 1), (9, 0)}
    assert problems[(0, 1)] == ["train.epochs: 99 in the member, 20 in this run"]  # num_workers ignored
    assert "fold 9 is not in" in problems[(9, 0)][0]
    with pytest.raises(CvError, match="train.epochs: 99"):
        resolve_members(str(tmp_path), folds, folds_file, cfg, force=False, echo=print)
    said = []
    resolve_members(str(tmp_path), folds, folds_file, cfg, force=True, echo=said.append)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt")) == ["fold0_seed0.pt"]
    RunDir(str(tmp_path)).prune_oof(k for f in folds["folds"] for k in f["val"])
    assert os.listdir(tmp_path / "oof") == ["fold0_seed0"]  # exactly the members present


def test_config_differences_named_key_by_key():
    old = {"train": {"epochs": 3, "num_workers": 4, "lr": 0.002}, "model": {"encoder": "resnet18"}}
    new = {"train": {"epochs": 2, "num_workers": 0, "lr": 0.002}, "model": {"encoder": "resnet18", "attention": "scse"}}
    assert config_differences(old, new) == ["model.attention: '<absent>' in the member, 'scse' in this run",
                                            "train.epochs: 3 in the member, 2 in this run"]  # num_workers: speed only
    assert config_differences(old, old) == [] and config_differences(None, {}) == []
    assert config_differences({"a": 1}, {"a": 2}, ignore=("a",)) == []
