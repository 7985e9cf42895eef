"""Many scenes on Dask distributed: a local cluster by default, an existing scheduler by
address. Each scene is one task (:func:`~.job.map_scene`, written atomically per scene);
a task that fails is retried (``retries``), then reported, never dropped; the command's
exit status says so and a re-run maps only what is missing.

Why Dask rather than Ray: the work is a bag of independent, coarse tasks (minutes each) on
files, which is exactly ``client.submit`` + ``as_completed``; ``distributed`` is a pure-Python
install that also runs on Kaggle and on a SLURM allocation (``dask-jobqueue``, ``dask
scheduler`` / ``dask worker``) with nothing to build, and its local cluster is the same API
as a remote one. Ray's actors, object store and its own cluster launcher are more than a
list of scenes needs.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

from glacier_runtime.atomic import atomic_write_text

from .job import MapOptions, ModelSource, map_scene, run_fingerprint, summary_line

REPORT = "map_report.json"

#: per worker process: loaded predictors by model fingerprint, and the GPU it was given
_LOADED: Dict[str, Any] = {}
_DEVICE: Dict[str, Optional[str]] = {"device": None}


def read_scene_list(path: str) -> List[str]:
    """One scene folder per line (``#`` comments, blank lines skipped; relative to the list's folder)."""
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line if os.path.isabs(line) else os.path.join(base, line))
    if not out:
        raise ValueError(f"{path} lists no scenes (one scene folder per line)")
    return out


def gpu_per_worker(gpus: int):
    """A Dask worker plugin: worker ``i`` of a local cluster maps on ``cuda:i`` (modulo the
    GPUs), set at each worker's start, so a worker the nanny restarts keeps its GPU. (Made
    here: ``distributed`` is imported only when many scenes are mapped.)"""
    from distributed.diagnostics.plugin import WorkerPlugin

    class GpuPerWorker(WorkerPlugin):
        name = "glacier-gpu-per-worker"

        def setup(self, worker) -> None:
            from glacier_submit.mapping import many  # the worker's module, not a pickled copy of its globals

            try:
                index = int(worker.name)
            except (TypeError, ValueError):
                index = abs(hash(worker.name))
            many._DEVICE["device"] = f"cuda:{index % gpus}"

    return GpuPerWorker()


def worker_device() -> Optional[str]:
    """The device the plugin bound on this worker (None: none bound)."""
    return _DEVICE["device"]


def map_task(scene: str, out: str, source: ModelSource, options: MapOptions, threads: Optional[int],
             fingerprint: str) -> Dict[str, Any]:
    """One scene on a worker: the worker's predictor is loaded once and reused."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if _DEVICE["device"] and source.device in (None, "cuda"):
        source = replace(source, device=_DEVICE["device"])
    key = f"{fingerprint} {source.device}"
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = source.load(options.block)
    return map_scene(scene, out, source, options, loaded=_LOADED[key], progress=False, fingerprint=fingerprint)


def check_names(scenes: Sequence[str]) -> None:
    """Two scenes of one name would write one output folder: refused before any work."""
    from .scene import SceneError, find_scene

    seen: Dict[str, str] = {}
    for s in scenes:
        name = find_scene(s).name
        if name in seen:
            raise SceneError(f"{seen[name]} and {s} are both scene {name} (one output folder, OUT/{name}); "
                             "list each scene once, and give role-named scene folders different names")
        seen[name] = s


@dataclass
class Report:
    done: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[Dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"done": [d["scene"] for d in self.done], "skipped": self.skipped, "failed": self.failed}


def start_client(workers: int, scheduler: Optional[str], device: Optional[str]):
    """(client, cluster, threads per worker, gpus bound): an existing scheduler's client, or a
    local cluster of ``workers`` processes (one per GPU where there are GPUs)."""
    from dask.distributed import Client, LocalCluster

    if not logging.getLogger("glacier").isEnabledFor(logging.INFO):  # -v shows Dask's own log
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler:
        return Client(scheduler), None, None, 0
    import torch

    from training.engine.launch import usable_cpus

    gpus = torch.cuda.device_count() if device in (None, "cuda") and torch.cuda.is_available() else 0
    n = min(workers, gpus) if gpus else workers
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    if gpus:
        register = getattr(client, "register_plugin", None) or client.register_worker_plugin
        register(gpu_per_worker(gpus))
    return client, cluster, max(1, usable_cpus() // n), gpus


def map_scenes(scenes: Sequence[str], out: str, source: ModelSource, options: Optional[MapOptions] = None,
               workers: int = 2, scheduler: Optional[str] = None, retries: int = 1,
               echo: Callable[[str], None] = print, progress: bool = True) -> Report:
    """Map ``scenes`` on Dask; writes ``out/map_report.json`` and returns the report."""
    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    options = options or MapOptions()
    check_names(scenes)
    fingerprint = run_fingerprint(source, options)  # once, not per task (it reads the model files)
    os.makedirs(out, exist_ok=True)
    client, cluster, threads, gpus = start_client(workers, scheduler, source.device)
    report, pending = Report(), {}
    try:
        where = f"scheduler {scheduler}" if scheduler else \
            f"local Dask cluster, {len(client.scheduler_info()['workers'])} worker(s)" + (f" on {gpus} GPU(s)" if gpus else "")
        echo(f"mapping {len(scenes)} scene(s) on {where}")
        pending = {client.submit(map_task, s, out, source, options, threads, fingerprint, retries=retries, pure=False,
                                 key=f"map-{i}-{os.path.basename(os.path.normpath(s))}"): s
                   for i, s in enumerate(scenes)}
        bar = tqdm(total=len(pending), unit="scene", disable=not progress)
        say = bar.write if progress else echo  # lines above the bar, not through it
        for fut in as_completed(list(pending)):
            scene = pending.pop(fut)
            if fut.status == "finished":
                s = fut.result()
                (report.skipped.append(s["scene"]) if s.get("skipped") else report.done.append(s))
                say(summary_line(s))
            else:  # error, or cancelled (a lost scheduler or worker)
                exc = fut.exception() if fut.status == "error" else f"task {fut.status}"
                why = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
                report.failed.append({"scene": scene, "error": why})
                say(f"FAILED {scene}: {why}")
            bar.update(1)
        bar.close()
    finally:
        # whatever happened, the report says what was done and what was not
        report.failed += [{"scene": s, "error": "not finished (the run stopped)"} for s in pending.values()]
        atomic_write_text(os.path.join(out, REPORT), json.dumps(report.to_dict(), indent=2) + "\n")
        client.close()
        if cluster is not None:
            cluster.close()
    return report
