"""The size budget: fp16 when fp32 is over it, the strongest members that fit, a refusal that
names the fix when none fits."""
import io
import os

import pytest
import torch

from glacier_runtime.predictor import load_payload
from glacier_submit.bundle import BudgetError, build
from glacier_submit.members import cast_payload, load_members, make_payload
from glacier_submit.sizing import blob_budget, check_upload, choose_precision, member_sizes, serialise, tensor_bytes

from tests.helpers import SMALL, member_mb


def test_size_budget_fp16_then_refusal(tiny_members, tmp_path):
    size32 = os.path.getsize(tiny_members[0]) * 2 / 2**20
    m = build(tiny_members, str(tmp_path / "b16"), max_mb=size32 * 0.8)
    assert m["runtime"]["precision"] == "fp16" and any("fp16" in n for n in m["notes"])
    assert m["runtime"]["fp16_agreement"] > 0.99
    p = load_payload(str(tmp_path / "b16" / "model.pth"))
    assert p["members"][0]["state_dict"]["encoder.conv1.weight"].dtype == torch.float16
    m = build(tiny_members, str(tmp_path / "b1"), max_mb=size32 * 0.3)  # room for one member: the strongest
    assert [e["name"] for e in m["members"]] == ["fold1_seed0"]
    with pytest.raises(BudgetError) as exc:
        build(tiny_members, str(tmp_path / "bx"), max_mb=size32 * 0.2)
    msg = str(exc.value)
    assert "no member fits" in msg and "fold0_seed0" in msg and "--max-mb" in msg


def test_nothing_fits_refuses_and_names_fix(tiny_members, tmp_path):
    with pytest.raises(BudgetError, match="--max-mb"):
        build(tiny_members, str(tmp_path / "b"), check_size=SMALL, max_mb=0.5 * member_mb(tiny_members[0]))


def test_blob_budget_formula():
    assert blob_budget(1000, 100, single_file=False) == 900        # the upload is solution.py + model.pth
    assert blob_budget(1000, 100, single_file=True) == (900 - 512) * 3 // 4 == 291  # base64 inside solution.py


def test_tensor_bytes_counted_by_hand():
    entry = {"state_dict": {"w": torch.zeros(10), "n": torch.zeros(3, dtype=torch.int64)}, "onnx": b"abcd"}
    assert tensor_bytes(entry, fp16=False) == 10 * 4 + 3 * 8 + 4
    assert tensor_bytes(entry, fp16=True) == 10 * 2 + 3 * 8 + 4       # integers keep their size
    assert tensor_bytes(dict(entry, onnx=torch.zeros(7, dtype=torch.uint8)), fp16=False) == 40 + 24 + 7
    assert tensor_bytes(dict(entry, onnx=None), fp16=False) == 64


def test_member_shares_add_up_to_the_payload(tiny_members):
    entries = load_members(tiny_members)
    inference = {"tta": "none"}
    for fp16 in (False, True):
        sizes, base = member_sizes(entries, inference, fp16)
        payload = make_payload(entries, inference)
        whole = len(serialise(cast_payload(payload, torch.float16) if fp16 else payload))
        assert sorted(sizes) == ["fold0_seed0", "fold1_seed0"]
        assert abs(base + sum(sizes.values()) - whole) < 4096, (base, sizes, whole)
        # one member's share is about its weights' bytes in the stored precision
        raw = tensor_bytes(entries[0], fp16)
        assert raw < sizes["fold0_seed0"] < raw * 1.1
    back = torch.load(io.BytesIO(serialise(make_payload(entries[:1], inference))), weights_only=True)
    assert back["members"][0]["name"] == "fold0_seed0" and back["inference"] == inference


def test_precision_choice_and_the_last_check():
    entries = [{"state_dict": {"w": torch.zeros(1000)}, "onnx": None, "name": "m", "meta": {"class_map": {}, "bands": []}}]
    notes = []
    assert choose_precision(entries, {}, "fp16", 10, notes) is True and choose_precision(entries, {}, "fp32", 10, notes) is False
    assert choose_precision(entries, {}, "auto", 10 ** 6, notes) is False and notes == []
    assert choose_precision(entries, {}, "auto", 1000, notes) is True and "stored in fp16" in notes[0]
    check_upload(b"x" * 10, b"y" * 90, single_file=False, budget=100, max_mb=1)
    with pytest.raises(BudgetError, match=r"solution.py \+ model.pth is 0.0 MB > 1 MB"):
        check_upload(b"x" * 11, b"y" * 90, single_file=False, budget=100, max_mb=1)
    check_upload(b"x" * 100, b"y" * 10 ** 6, single_file=True, budget=100, max_mb=1)  # the blob is inside the source
    with pytest.raises(BudgetError, match="--single-file solution.py"):
        check_upload(b"x" * 101, b"", single_file=True, budget=100, max_mb=1)
