"""Space-separated values of multi-value options (an unquoted glob, --seeds 0 1 2) expand to
repeated options."""
from glacier_cli.argv import expand_multi
from training.cli import MULTI_VALUE_OPTIONS


def test_seeds_space_separated():
    assert expand_multi(["cv", "--seeds", "0", "1", "2", "--out", "w"], MULTI_VALUE_OPTIONS) == \
        ["cv", "--seeds", "0", "--seeds", "1", "--seeds", "2", "--out", "w"]
    assert expand_multi(["--seeds", "3"], MULTI_VALUE_OPTIONS) == ["--seeds", "3"]


def test_models_unquoted_glob_expands():
    argv = ["build", "--models", "w/a.pt", "w/b.pt", "w/logs", "--out", "s"]
    assert expand_multi(argv, ("--models",)) == ["build", "--models", "w/a.pt", "--models", "w/b.pt", "--models", "w/logs", "--out", "s"]
