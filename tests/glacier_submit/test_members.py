"""Member checkpoints for a bundle: crafted ones refused, members that disagree on bands refused,
pre-training checkpoints in a glob skipped with a note."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from glacier_submit.bundle import build
from glacier_submit.members import load_members

from tests.helpers import SMALL, craft, make_member


def test_member_checkpoint_refused(tmp_path, tiny_members):
    from glacier_submit.members import load_members
    from training.engine.checkpoint import CheckpointError

    marker = str(tmp_path / "PWNED")
    ck = torch.load(tiny_members[0], weights_only=True)
    evil = craft(str(tmp_path / "fold9_seed0.pt"), marker, ck)
    with pytest.raises(CheckpointError, match="refused to load checkpoint"):
        load_members([evil])
    assert not os.path.exists(marker)


def test_members_with_different_bands_refused(tmp_path, tiny_members):
    bad = make_member(str(tmp_path / "x.pt"))
    ck = torch.load(bad, weights_only=False)
    ck["bands"] = ["B2", "B3", "B4", "B5", "B10"]
    torch.save(ck, bad)
    with pytest.raises(ValueError, match="disagree on bands"):
        load_members([tiny_members[0], bad])


def test_pretrain_checkpoint_in_glob_is_skipped_with_note(tiny_members, tmp_path):
    """A glob matching members + an HKH checkpoint used to fail with 'members disagree on bands'."""
    import shutil

    d = tmp_path / "weights"
    d.mkdir()
    for p in tiny_members:
        shutil.copy(p, d / os.path.basename(p))
    hkh = make_member(str(d / "hkh.pt"), fold=-1)
    ck = torch.load(hkh, weights_only=False)
    ck["bands"], ck["sensor"] = ["B1", "B2", "B3", "B5", "B6_high"], "L7"
    torch.save(ck, hkh)  # the file pretrain.py writes today: fold -1, L7 bands, no "kind"
    marked = make_member(str(d / "hkh2.pt"))
    ck = torch.load(marked, weights_only=False)
    ck["kind"] = "pretrain"
    torch.save(ck, marked)
    from glacier_submit.cli import cli

    out = str(tmp_path / "b")
    r = CliRunner().invoke(cli, ["build", "--models", str(d / "*.pt"), "--out", out])
    assert r.exit_code == 0, r.output
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert sorted(e["name"] for e in man["members"]) == ["fold0_seed0", "fold1_seed0"]
    assert any("hkh.pt" in n and "pre-training" in n for n in man["notes"])
    assert any("hkh2.pt" in n for n in man["notes"])
    assert "hkh.pt" in r.output
    with pytest.raises(ValueError, match="only pre-training checkpoints"):
        build([hkh], str(tmp_path / "c"), check_size=SMALL)


def test_payload_of_members_and_of_a_bundle(tiny_members, bundle):
    """Oracle: torch.load of the files themselves (the members' weights, the bundle's model.pth)."""
    from glacier_submit.members import payload_of

    p = payload_of(members=tiny_members)
    assert p["inference"] == {} and len(p["members"]) == 2 and p["bands"] == ["B2", "B3", "B4", "B6", "B10"]
    for entry, path in zip(p["members"], tiny_members):
        raw = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.equal(entry["state_dict"][k], v) for k, v in raw.items())
    folder, _ = bundle
    stored = torch.load(os.path.join(folder, "model.pth"), map_location="cpu", weights_only=False)
    got = payload_of(bundle=folder)
    assert got["inference"] == stored["inference"] and len(got["members"]) == len(stored["members"])
