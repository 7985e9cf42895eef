"""The parsed parameters of glacier-train cv: children get the same run from them; --set values
are parsed as YAML, and one without '=' is an error naming it."""
import os

import pytest

from training.runs.run import CvError, parse_sets

from tests.helpers import ROOT


def test_child_arguments_come_from_parsed_parameters():
    from training.runs.cv import CvRun

    run = CvRun(config=os.path.join(ROOT, "configs", "quickstart.yaml"), data=ROOT,
                folds_path=os.path.join(ROOT, "pyproject.toml"), out="o", seeds=(0, 1), only_folds=(2,),
                sets=("train.epochs=3",), verbose=True, worker=1, loader_workers=0, parent_lock=True)
    args = run.cli_args()
    assert args[:2] == ["-v", "cv"]  # -v reaches the children
    # round trip through the real command-line parser: the child sees the same run
    from training.cli import cv_command

    ctx = cv_command.make_context("cv", list(args[2:]))
    p = ctx.params
    assert (p["seeds"], p["only_folds"], p["sets"], p["worker_id"], p["loader_workers"], p["parent_lock"]) == \
        ((0, 1), (2,), ("train.epochs=3",), 1, 0, True)
    assert p["gpus"] == 1 and p["parallel_folds"] == 1 and p["folds_path"].endswith("pyproject.toml")


def test_set_values_parsed_as_yaml():
    assert parse_sets(["train.epochs=3", "model.decoder_channels=[16,16,8]", "loss.class_weights=auto",
                       "train.amp=true", " train.lr =0.5", "data.note=a=b", "model.encoder_weights=null"]) == {
        "train.epochs": 3, "model.decoder_channels": [16, 16, 8], "loss.class_weights": "auto", "train.amp": True,
        "train.lr": 0.5, "data.note": "a=b", "model.encoder_weights": None}
    assert parse_sets([]) == {}
    with pytest.raises(CvError, match="--set expects key=value.*'train.epochs'"):
        parse_sets(["train.epochs"])
