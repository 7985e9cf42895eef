"""Nothing loads a pickle: a crafted file is refused in every load place and its side effect
never happens (issue 13, items 5 and 6), also under Python 3.9 + torch 2.0.1 (compat)."""
import ast
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from glacier_submit.bundle import build
from glacier_submit.sandbox import run_bundle
from glacier_runtime.predictor import Predictor, load_payload
from glacier_runtime.safeload import UnsafeFileError, plain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY39 = os.environ.get("GLACIER_PY39", os.path.join(ROOT, ".venv39", "bin", "python"))


class _Evil:
    """Unpickling this calls os.mkdir(marker): proof that code from the file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def craft(path: str, marker: str, base: dict = None) -> str:
    """A file that looks like ``base`` (a payload or checkpoint) but carries a reduce payload."""
    obj = dict(base or {})
    obj["evil"] = _Evil(marker)
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def real_bundle(tiny_members, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trust_bundle") / "b")
    build(tiny_members, out)
    return out


def test_payload_refused_and_never_unpickled(real_bundle, tmp_path):
    marker = str(tmp_path / "PWNED")
    evil = craft(str(tmp_path / "model.pth"), marker, load_payload(os.path.join(real_bundle, "model.pth")))
    with pytest.raises(UnsafeFileError) as exc:
        load_payload(evil)
    assert not os.path.exists(marker)
    assert evil in str(exc.value) and "weights_only=True" in str(exc.value) and "rebuild" in str(exc.value)
    with open(evil, "rb") as fh:  # the embedded (--single-file) path loads from bytes
        with pytest.raises(UnsafeFileError):
            load_payload(fh)
    assert not os.path.exists(marker)


def test_payload_refused_inside_the_bundle(real_bundle, tmp_path):
    marker = str(tmp_path / "PWNED")
    bad = str(tmp_path / "bad")
    shutil.copytree(real_bundle, bad)
    craft(os.path.join(bad, "model.pth"), marker, load_payload(os.path.join(real_bundle, "model.pth")))
    from tests.conftest import make_tile

    make_tile(str(tmp_path / "data"), "001", naming="test")
    for conv in ("imagepath", "import-call"):
        res = run_bundle(bad, str(tmp_path / "data"), conv, timeout=300)
        assert not res.ok and "refused to load model payload" in res.stderr, res.tail()
        assert not os.path.exists(marker)


def test_member_checkpoint_refused(tmp_path, tiny_members):
    from glacier_submit.members import load_members
    from training.engine.checkpoint import CheckpointError

    marker = str(tmp_path / "PWNED")
    ck = torch.load(tiny_members[0], weights_only=True)
    evil = craft(str(tmp_path / "fold9_seed0.pt"), marker, ck)
    with pytest.raises(CheckpointError, match="refused to load checkpoint"):
        load_members([evil])
    assert not os.path.exists(marker)


def test_init_from_refused(tmp_path):
    from training.engine.checkpoint import CheckpointError
    from training.config import load_config
    from training.runs.transfer import load_init_state

    marker = str(tmp_path / "PWNED")
    evil = craft(str(tmp_path / "hkh.pt"), marker, {"state_dict": {}, "sensor": "L7"})
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), {"model.decoder_channels": [16, 16, 16, 8, 8]})
    with pytest.raises(CheckpointError, match="--init-from checkpoint"):
        load_init_state(evil, cfg)
    assert not os.path.exists(marker)


def _tiny_training(synth_data):
    from training.config import load_config
    from training.data.competition import CompetitionDataset

    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      {"train.epochs": 1, "train.patches_per_epoch": 4, "train.batch_size": 4, "train.patch_size": 64,
                       "model.decoder_channels": [16, 16, 16, 8, 8], "train.warmup_epochs": 0})
    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    return cfg, ds, ds.keys[:6], ds.keys[6:8]


def test_resume_state_refused(synth_data, tmp_path):
    """A crafted last.pt in the work folder stops the run before any epoch; never unpickled."""
    from training.engine.checkpoint import CheckpointError
    from training.engine.trainer import train_member

    cfg, ds, tr, va = _tiny_training(synth_data)
    marker = str(tmp_path / "PWNED")
    work = tmp_path / "work"
    work.mkdir()
    craft(str(work / "last.pt"), marker, {"fold": 0, "seed": 0})
    with pytest.raises(CheckpointError, match="resume state"):
        train_member(cfg, ds, tr, va, 0, 0, str(tmp_path / "fold0_seed0.pt"), str(work), progress=False)
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "fold0_seed0.pt")


def test_best_checkpoint_refused(synth_data, tmp_path, monkeypatch):
    """The best-epoch checkpoint is re-read at the end of a run: a crafted one is refused."""
    import training.engine.trainer as trainer
    from training.engine.checkpoint import CheckpointError

    cfg, ds, tr, va = _tiny_training(synth_data)
    marker = str(tmp_path / "PWNED")
    real_save = trainer.save_atomic

    def swap_best(obj, path):
        if os.path.basename(path) == "best.pt":
            craft(path, marker, {"state_dict": {}})
        else:
            real_save(obj, path)

    monkeypatch.setattr(trainer, "save_atomic", swap_best)
    with pytest.raises(CheckpointError, match="best-epoch checkpoint"):
        trainer.train_member(cfg, ds, tr, va, 0, 0, str(tmp_path / "m.pt"), str(tmp_path / "work"), progress=False)
    assert not os.path.exists(marker)


def test_every_torch_load_is_weights_only():
    """Structural guard: the only torch.load in the product is safeload's, with weights_only=True."""
    calls = []
    for pkg in ("glacier_runtime", "glacier_submit", "training"):
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(folder, f)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                            and getattr(node.func.value, "id", None) == "torch":
                        kw = {k.arg: k.value for k in node.keywords}
                        ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                        calls.append((os.path.relpath(path, ROOT), node.lineno, ok))
    bad = [c for c in calls if not c[2] or c[0] not in ("glacier_runtime/safeload.py", "training/models.py")]
    assert calls and not bad, bad


def test_plain_converts_numpy_and_refuses_objects():
    out = plain({"a": np.float64(0.5), "b": np.arange(3), "c": [np.int64(2), (1, None)], "d": torch.ones(2)})
    assert out["a"] == 0.5 and type(out["a"]) is float and isinstance(out["b"], torch.Tensor)
    assert out["c"][0] == 2 and type(out["c"][0]) is int
    with pytest.raises(TypeError, match=r"payload\['x'\]\[0\] holds a .*_Evil"):
        plain({"x": [_Evil("nowhere")]})
    with pytest.raises(TypeError, match="bytes"):
        plain({"blob": b"abc"})  # bytes need _codecs.encode under torch 2.0's weights_only loader


def test_checkpoints_written_are_plain(tmp_path):
    """numpy values in a checkpoint are converted at save time, so it loads with weights_only=True."""
    from training.engine.checkpoint import load_state, save_atomic

    p = str(tmp_path / "x.pt")
    save_atomic({"history": [{"val_mcc": np.float64(0.7)}], "shares": np.array([0.5, 0.5])}, p)
    ck = load_state(p)
    assert ck["history"][0]["val_mcc"] == 0.7 and torch.equal(ck["shares"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(TypeError):
        save_atomic({"x": object()}, str(tmp_path / "y.pt"))
    assert not os.path.exists(tmp_path / "y.pt")


# ---- item 6: only the bundle's own weights ---------------------------------------------------------------------

def test_model_in_cwd_is_never_loaded(real_bundle, tmp_path):
    """solution.py without model.pth beside it fails, even when the working directory has one."""
    from tests.conftest import make_tile

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(real_bundle, "solution.py"), alone / "solution.py")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.copy(os.path.join(real_bundle, "model.pth"), cwd / "model.pth")
    make_tile(str(tmp_path / "data"), "001", naming="test")
    r = subprocess.run([sys.executable, str(alone / "solution.py"), "--imagepath", str(tmp_path / "data"),
                        "--output", str(tmp_path / "o")], cwd=str(cwd), capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode != 0 and "not found beside solution.py" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o" / "img001.tif")


def test_single_file_prefers_its_embedded_weights(tiny_members, messy_test_data, tmp_path):
    """A stray model.pth beside a --single-file solution.py is ignored: the embedded weights are the bundle's."""
    single = str(tmp_path / "single")
    build(tiny_members[:1], single, single_file=True)
    other = str(tmp_path / "other")
    build(tiny_members[1:], other)
    shutil.copy(os.path.join(other, "model.pth"), os.path.join(single, "model.pth"))
    res = run_bundle(single, messy_test_data, "imagepath", str(tmp_path / "m"), timeout=300)
    assert res.ok, res.tail()
    from glacier_runtime.entry import predict_folder
    from glacier_submit.members import load_members, make_payload

    ref_pred = Predictor.from_payload(make_payload(load_members(tiny_members[:1]), {}), device="cpu")
    ref = predict_folder(ref_pred, messy_test_data, None, progress=False)
    assert sorted(res.masks) == sorted(ref)
    assert all(np.array_equal(res.masks[k], ref[k]) for k in ref)


# ---- the platform's interpreter ---------------------------------------------------------------------------------

@pytest.mark.compat
@pytest.mark.skipif(not os.path.exists(PY39), reason=f"no Python 3.9 + torch 2.0 venv at {PY39}: run `make venv39`")
def test_weights_only_on_torch20_refuses_crafted_accepts_real(real_bundle, tmp_path):
    marker = str(tmp_path / "PWNED")
    evil = craft(str(tmp_path / "model.pth"), marker, load_payload(os.path.join(real_bundle, "model.pth")))
    script = ("import sys; sys.path.insert(0, sys.argv[1]);"
              "import torch; assert torch.__version__.startswith('2.0'), torch.__version__\n"
              "from glacier_runtime.predictor import load_payload\n"
              "from glacier_runtime.safeload import UnsafeFileError\n"
              "p = load_payload(sys.argv[2]); print('REAL', len(p['members']))\n"
              "try:\n    load_payload(sys.argv[3]); print('LOADED')\n"
              "except UnsafeFileError as e:\n    print('REFUSED', e)\n")
    r = subprocess.run([PY39, "-c", script, ROOT, os.path.join(real_bundle, "model.pth"), evil],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REAL 2" in r.stdout and "REFUSED" in r.stdout and "LOADED" not in r.stdout
    assert not os.path.exists(marker)
    bad = str(tmp_path / "bad")
    shutil.copytree(real_bundle, bad)
    shutil.copy(evil, os.path.join(bad, "model.pth"))
    from tests.conftest import make_tile

    make_tile(str(tmp_path / "data"), "001", naming="test")
    res = run_bundle(bad, str(tmp_path / "data"), "import-call", timeout=600, python=PY39)
    assert not res.ok and "refused to load model payload" in res.stderr, res.tail()
    assert not os.path.exists(marker)
