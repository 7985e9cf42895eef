"""glacier-train fetch: the competition archive extracted and inspected, HKH patches through a
mirror read by the HKH reader, a source that is neither 'hkh' nor a URL refused."""
from __future__ import annotations

import os
import tarfile
import zipfile

import pytest
from click.testing import CliRunner

from training.data.download import FetchError
from training.data.fetch import fetch

from tests.helpers import quiet_fetch


def _fake_competition_zip(path, tmp_path):
    from training.data.synth import generate_dataset

    src = tmp_path / "src"
    generate_dataset(str(src), n_tiles=4, size=(48, 48), seed=1)
    with zipfile.ZipFile(path, "w") as zf:
        for folder, _, files in os.walk(src / "train"):
            for f in files:
                full = os.path.join(folder, f)
                zf.write(full, os.path.join("glacierhack", os.path.relpath(full, src / "train")))


def test_fetch_competition_zip_extracts_and_inspects(server, tmp_path):
    arc = tmp_path / "comp.zip"
    _fake_competition_zip(arc, tmp_path)
    server.routes["/comp.zip"] = {"body": arc.read_bytes()}
    out = tmp_path / "dl"
    info, msgs = quiet_fetch(server.url("/comp.zip"), str(out), delete_archive=True)
    text = "\n".join(msgs)
    assert info["summary"]["layout"] == "competition" and info["summary"]["errors"] == 0
    assert "4 tiles" in text and "overall class share" in text  # inspect's summary
    assert not (out / "comp.zip").exists() and (out / "glacierhack" / "Band1").is_dir()
    info2, msgs2 = quiet_fetch(server.url("/comp.zip"), str(out), delete_archive=True)
    assert len(server.log) == 1 and "nothing to fetch" in msgs2[0]


def test_fetch_hkh_with_mirror_runs_hkh_reader(server, tmp_path):
    from training.data.hkh import write_fake_hkh

    src = tmp_path / "hkhsrc"
    write_fake_hkh(str(src / "patches"), n_train=2, n_val=1, size=32)
    arc = tmp_path / "hkh_patches.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(src / "patches", arcname="patches")
    server.routes["/hkh_patches.tar.gz"] = {"body": arc.read_bytes()}
    from training.cli import cli

    out = tmp_path / "hkh"
    r = CliRunner().invoke(cli, ["fetch", "hkh", "--out", str(out), "--mirror", server.url("/404/hkh_patches.tar.gz"),
                                 "--mirror", server.url("/hkh_patches.tar.gz"), "--backoff", "0"])
    assert r.exit_code == 0, r.output
    assert f"HKH patches in {out / 'patches'}: train 2, val 1" in r.output
    assert "(32, 32, 15)" in r.output and f"--data {out / 'patches'}" in r.output
    assert (out / "hkh_patches.tar.gz").exists()  # kept without --delete-archive


def test_fetch_rejects_non_url(tmp_path):
    with pytest.raises(FetchError, match="neither 'hkh' nor a URL"):
        fetch("data.zip", str(tmp_path), say=lambda m: None)
