"""Nothing loads a pickle: a crafted model payload is refused and its side effect never happens,
also under Python 3.9 + torch 2.0.1 (compat); the only torch.load is safeload's, with
weights_only=True; payloads hold plain types only."""
import ast
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from glacier_runtime.predictor import load_payload
from glacier_runtime.safeload import UnsafeFileError, plain
from glacier_submit.sandbox import run_bundle

from tests.helpers import PY39, ROOT, _Evil, craft


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
    from tests.helpers import make_tile

    make_tile(str(tmp_path / "data"), "001", naming="test")
    res = run_bundle(bad, str(tmp_path / "data"), "import-call", timeout=600, python=PY39)
    assert not res.ok and "refused to load model payload" in res.stderr, res.tail()
    assert not os.path.exists(marker)
