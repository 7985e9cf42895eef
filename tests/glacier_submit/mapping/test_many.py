"""Many scenes on a local Dask cluster of two workers, one scene corrupt: two are written,
the corrupt one is reported (after its retry) and the exit status says so; a re-run skips
the finished two."""
import json
import os
import subprocess
import sys

from training.data.landsat import scene_id, write_landsat_scene

from tests.helpers import make_member, repo_env


def _cmd(scenes_file, member, out):
    return [sys.executable, "-m", "glacier_submit.cli", "map", "--scenes", scenes_file, "--models", member,
            "--out", out, "--workers", "2", "--device", "cpu", "--no-outlines"]


def test_three_scenes_two_workers_one_corrupt(tmp_path):
    root = tmp_path / "scenes"
    names = [scene_id(date=d) for d in ("20210101", "20210117", "20210202")]
    folders = [write_landsat_scene(str(root), 384, 448, seed=i, content="noise", name=n).folder
               for i, n in enumerate(names)]
    bad = os.path.join(folders[1], f"{names[1]}_B4.TIF")
    with open(bad, "r+b") as f:
        f.truncate(300)  # a download cut short
    lst = tmp_path / "scenes.txt"
    lst.write_text("# three scenes\n" + "\n".join(os.path.relpath(f, tmp_path) for f in folders) + "\n\n")
    member, out = make_member(str(tmp_path / "m.pt")), str(tmp_path / "maps")
    r = subprocess.run(_cmd(str(lst), member, out), env=repo_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert "local Dask cluster, 2 worker(s)" in r.stdout and "2 mapped, 0 done already, 1 failed" in r.stdout
    assert f"FAILED {folders[1]}" in r.stdout and "_B4.TIF" in r.stdout
    assert "1 of 3 scene(s) failed after 1 retry" in r.stderr and "re-run the same command" in r.stderr
    done = sorted(d for d in os.listdir(out) if not d.endswith(".json"))
    assert done == sorted([names[0], names[2]])
    for n in done:
        assert os.path.exists(os.path.join(out, n, "classes.tif")) and os.path.exists(os.path.join(out, n, "summary.json"))
    report = json.load(open(os.path.join(out, "map_report.json")))
    assert sorted(report["done"]) == sorted([names[0], names[2]]) and report["failed"][0]["scene"] == folders[1]
    mtimes = {n: os.path.getmtime(os.path.join(out, n, "classes.tif")) for n in done}

    r = subprocess.run(_cmd(str(lst), member, out), env=repo_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "0 mapped, 2 done already, 1 failed" in r.stdout, r.stdout[-2000:]
    assert {n: os.path.getmtime(os.path.join(out, n, "classes.tif")) for n in done} == mtimes


def test_two_scenes_of_one_name_are_refused_before_any_work(tmp_path):
    import pytest

    from glacier_submit.mapping.many import check_names
    from glacier_submit.mapping.scene import SceneError

    a = write_landsat_scene(str(tmp_path / "a"), 64, 64, content="noise").folder
    b = write_landsat_scene(str(tmp_path / "b"), 64, 64, content="noise").folder
    check_names([a])
    with pytest.raises(SceneError, match="are both scene LC08_L1TP_140041_20211015_20211015_02_T1"):
        check_names([a, b])


def test_each_local_worker_is_bound_to_its_gpu():
    """The worker plugin (registered where GPUs exist) binds worker i to cuda:i modulo the GPUs;
    checked on CPU workers, where nothing runs on the device."""
    import logging

    from dask.distributed import Client, LocalCluster

    from glacier_submit.mapping.many import gpu_per_worker, worker_device

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        register = getattr(client, "register_plugin", None) or client.register_worker_plugin
        register(gpu_per_worker(2))
        got = client.run(worker_device)
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    assert sorted(got.values()) == ["cuda:0", "cuda:1"]
    assert all(got[a] == f"cuda:{int(n) % 2}" for a, n in names.items())
