"""The predictor: members x TTA views x scales over windows, merged on probabilities,
then a per-class log-probability bias, argmax and post-processing.

The same code validates during training, runs ``glacier-submit predict``/``evaluate`` and
ships inside the bundle. Memory is bounded: one probability accumulator per tile; windows,
views and members are streamed.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import postprocess
from .crf import crf_refine, validate_crf
from .backends import OnnxRunner, TorchRunner, cpu_cores, onnxruntime_available, set_worker_threads
from .classes import CLASS_VALUES
from .decision import decide
from .models import build_model
from .normalize import apply_stats, masked_pixels, tile_stats
from .safeload import UnsafeFileError, safe_load
from .settings import InferenceSettings
from .tta import group_views, rescale, resolve_views, scaled_size
from .window import blend_weight, pad_to_multiple, plan_blocks, plan_windows

log = logging.getLogger("glacier.runtime")



class Member:
    """One trained model with its own normalisation statistics and ensemble weight."""

    def __init__(self, runner, stats: Mapping[str, Any], weight: float = 1.0, name: str = "member",
                 n_classes: int = 4, meta: Optional[Dict[str, Any]] = None):
        self.runner, self.stats, self.weight, self.name = runner, stats, float(weight), name
        self.n_classes = n_classes
        self.meta = meta or {}


def member_from_entry(entry: Mapping[str, Any], device: Optional[str] = None, backend: str = "auto",
                      adaptable: bool = False) -> Member:
    """Build a Member from a payload entry (format: see docs/BUNDLE.md); ``adaptable`` keeps
    what test-time batch-norm adaptation needs (the torch backend only)."""
    spec = entry["spec"]
    use_onnx = backend == "onnx" or (backend == "auto" and entry.get("onnx") is not None and onnxruntime_available())
    if use_onnx:
        if entry.get("onnx") is None:
            raise ValueError(f"member {entry.get('name')} has no ONNX graph; build with --backend onnx")
        blob = entry["onnx"]
        blob = blob.numpy().tobytes() if isinstance(blob, torch.Tensor) else bytes(blob)
        runner = OnnxRunner(blob, device)
    else:
        if not entry.get("state_dict") and entry.get("onnx") is not None:
            raise RuntimeError(
                f"member {entry.get('name')} ships only an ONNX graph ({entry.get('precision', 'fp32')}) and "
                + ("onnxruntime cannot be imported here: install it (pip install onnxruntime; solution.py names it "
                   "in a '# pip install' line)" if backend != "torch" else "the torch backend was asked for: run it "
                   "with the onnx or auto backend") + ", or rebuild the bundle with --precision fp32")
        model = build_model(spec)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in entry["state_dict"].items()}
        model.load_state_dict(sd, strict=True)
        runner = TorchRunner(model, device, adaptable=adaptable)
    return Member(runner, entry["stats"], entry.get("weight", 1.0), entry.get("name", "member"),
                  int(spec["classes"]), entry.get("meta"))


class Predictor:
    def __init__(self, members: Sequence[Member], inference: Any = None,
                 class_values: Sequence[int] = CLASS_VALUES):
        if not members:
            raise ValueError("a predictor needs at least one member")
        cfg = inference if isinstance(inference, InferenceSettings) else InferenceSettings.from_dict(inference)
        self.cfg = cfg
        self.members = list(members)
        self.n_classes = self.members[0].n_classes
        self.views = resolve_views(cfg.tta)
        self.scales = [float(s) for s in cfg.scales]
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        self.bias = np.zeros(self.n_classes, np.float32) if cfg.bias is None else np.asarray(cfg.bias, np.float32)
        if self.bias.shape != (self.n_classes,):
            raise ValueError(f"bias needs {self.n_classes} values, got {self.bias.tolist()}")
        self.rules = postprocess.validate_rules(cfg.postprocess or [])
        self.crf = validate_crf(cfg.crf)
        if cfg.adapt not in (None, "bn"):
            raise ValueError(f"adapt must be None or 'bn', got {cfg.adapt!r}")
        self.class_values = np.asarray(list(class_values)[: self.n_classes], np.uint8)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], device: Optional[str] = None, backend: str = "auto",
                     overrides: Optional[Mapping[str, Any]] = None, members: Optional[Sequence[int]] = None) -> "Predictor":
        entries = list(payload["members"])
        if members is not None:
            entries = [entries[i] for i in members]
        inference = InferenceSettings.from_dict({**(payload.get("inference") or {}), **(overrides or {})})
        adapt = inference.adapt == "bn"
        # adaptation needs the torch model: a member with its state dict runs torch under auto
        built = [member_from_entry(e, device, "torch" if adapt and backend == "auto" and e.get("state_dict") else backend,
                                   adaptable=adapt) for e in entries]
        values = payload.get("class_map", {}).get("values", CLASS_VALUES)
        return cls(built, inference, values)

    def adapt_bn(self, tiles) -> int:
        """Test-time adaptation (``adapt: bn``): each member's batch-norm statistics
        re-estimated on ``tiles`` (raw (C, H, W) arrays, normalised and padded as for
        prediction; windows of tiles larger than ``window``; see glacier_runtime/adapt.py).
        ``tiles`` is a list, or a function returning a fresh iterator of them (read once per
        member, so they need not all be in memory). Skipped: fully masked tiles and windows,
        and tiles too small for the deepest batch norm (one value per channel after the
        network's stride). A member that cannot adapt (an ONNX graph) or fails keeps its
        trained statistics, with a warning naming it; the others adapt. Returns the tiles used."""
        if callable(tiles):
            source = tiles
        else:
            kept = list(tiles)
            source = lambda: iter(kept)  # noqa: E731
        stride = int(self.cfg.stride)
        window = max(stride, int(self.cfg.window) // stride * stride)
        adapted, used_tiles = [], 0
        for m in self.members:
            if not hasattr(m.runner, "adapt_bn"):
                log.warning("member %s runs an ONNX graph: batch-norm adaptation skipped for it", m.name)
                continue
            if not m.runner.can_adapt:
                log.warning("member %s: batch-norm adaptation skipped (no batch norm left to adapt: folded)", m.name)
                continue
            seen = {"tiles": 0}

            def inputs(member=m, seen=seen):
                for t in source():
                    raw, _ = pad_to_multiple(t, stride)
                    if masked_pixels(t).all() or (raw.shape[1] // stride) * (raw.shape[2] // stride) < 2:
                        continue
                    norm = tile_stats(t, member.stats)
                    fed = False
                    for (y0, x0, wh, ww) in plan_windows(raw.shape[1], raw.shape[2], window, 0.0):
                        win = raw[:, y0:y0 + wh, x0:x0 + ww]
                        if not (np.isfinite(win).all(axis=0) & ~masked_pixels(win)).any():
                            continue  # nothing valid in this window
                        fed = True
                        yield torch.from_numpy(np.ascontiguousarray(apply_stats(win, norm)))[None]
                    seen["tiles"] += int(fed)

            try:
                used = m.runner.adapt_bn(inputs())
            except Exception as exc:  # noqa: BLE001 - one member's failure must not stop the others
                log.warning("member %s: batch-norm adaptation failed (%s); it keeps its trained statistics", m.name, exc)
                continue
            if not used:
                log.warning("member %s: batch-norm adaptation skipped (no test tile with valid pixels large enough)",
                            m.name)
                continue
            adapted.append(m.name)
            used_tiles = seen["tiles"]
        if adapted:
            log.info("batch-norm statistics of %d of %d member(s) re-estimated on %d test tile(s)", len(adapted),
                     len(self.members), used_tiles)
        else:
            log.warning("batch-norm adaptation: no member adapted; trained statistics kept")
        return used_tiles

    @property
    def n_forward_views(self) -> int:
        return len(self.views) * len(self.scales) * len(self.members)

    # -- inference ----------------------------------------------------------------------------
    def _member_weights(self) -> List[float]:
        if self.cfg.merge == "weighted":
            w = [max(m.weight, 0.0) for m in self.members]
            s = sum(w)
            if s > 0:
                return [x / s for x in w]
        return [1.0 / len(self.members)] * len(self.members)

    def _max_batch(self, member: Member) -> int:
        mb = self.cfg.max_batch
        if mb in (None, "auto"):
            runner = member.runner
            if getattr(runner, "device", None) is not None and runner.device.type == "cuda":
                return 8  # a default: not measured on a GPU
            return 1 if isinstance(runner, OnnxRunner) else 2  # benchmarks/inference_speed.py
        return max(1, int(mb))

    def _workers(self, members: Sequence[Member]) -> int:
        """Work items at once: 1 on CUDA (batched views instead), else one per core (max 4)."""
        wk = self.cfg.workers
        if any(getattr(m.runner, "device", None) is not None and m.runner.device.type == "cuda" for m in members):
            return 1
        if wk in (None, "auto"):
            return min(4, cpu_cores())
        return max(1, int(wk))

    def _pool(self, workers: int) -> ThreadPoolExecutor:
        """A persistent pool whose threads each run with cores // workers intra-op threads."""
        pool = getattr(self, "_pool_obj", None)
        if pool is None or self._pool_size != workers:
            if pool is not None:
                pool.shutdown(wait=True)
            threads = max(1, cpu_cores() // workers)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="glacier-item",
                                      initializer=set_worker_threads, initargs=(threads,))
            self._pool_obj, self._pool_size = pool, workers
        return pool

    def _items_proba(self, mems: Sequence[Member], weights: Sequence[float], windows: Sequence[np.ndarray],
                     views, scales, workers: int) -> np.ndarray:
        """sum_m w_m * mean over views/scales of softmax probabilities, for one window of every
        member, with (member, scale, view) work items spread over ``workers`` threads.

        Each thread owns one accumulator; a view's inverse is applied as a numpy view of that
        accumulator (no copy of the probabilities), the softmax is taken in place on the
        logits. The per-thread sums are added in a fixed order, so results are deterministic.
        """
        k = mems[0].n_classes
        h, w = windows[0].shape[-2:]
        stride = int(self.cfg.stride)
        items: List[Tuple[int, float, Any]] = []
        inputs: Dict[Tuple[int, float], torch.Tensor] = {}
        for mi, x in enumerate(windows):
            xt = torch.from_numpy(np.ascontiguousarray(x))[None]
            for s in scales:
                size = scaled_size(h, w, s, stride) if s != 1.0 else (h, w)
                inputs[(mi, s)] = rescale(xt, size)
                items.extend((mi, s, v) for v in views)
        per_item = [weights[mi] / (len(views) * len(scales)) for mi, _, _ in items]

        def run(slot: int) -> np.ndarray:
            acc = np.zeros((k, h, w), np.float32)
            with torch.no_grad():
                for j in range(slot, len(items), workers):
                    mi, s, v = items[j]
                    logits = mems[mi].runner(v.forward(inputs[(mi, s)])).float()
                    probs = torch.softmax(logits, dim=1)
                    if s != 1.0:
                        probs = rescale(v.inverse(probs), (h, w))
                        np.add(acc, per_item[j] * probs[0].numpy(), out=acc)
                    else:  # the inverse as a strided view of the accumulator: no copy
                        target = _view_forward_np(v, acc)
                        target += per_item[j] * probs[0].numpy()
            return acc

        if workers <= 1 or len(items) <= 1:
            return run(0)
        parts = list(self._pool(workers).map(run, range(min(workers, len(items)))))
        total = parts[0]
        for part in parts[1:]:
            total += part
        return total

    def _views_proba(self, member: Member, x: torch.Tensor, views, scales) -> torch.Tensor:
        """Mean softmax over views and scales for one (1, C, h, w) window -> (K, h, w)."""
        h, w = x.shape[-2:]
        total = torch.zeros((member.n_classes, h, w), dtype=torch.float32)
        n = 0
        stride = int(self.cfg.stride)
        max_batch = self._max_batch(member)
        for s in scales:
            size = scaled_size(h, w, s, stride) if s != 1.0 else (h, w)
            xs = rescale(x, size)
            for group in group_views(views, *size):
                for i in range(0, len(group), max_batch):
                    chunk = group[i:i + max_batch]
                    batch = torch.cat([v.forward(xs) for v in chunk], 0)
                    probs = torch.softmax(member.runner(batch).float(), dim=1).cpu()
                    for j, v in enumerate(chunk):
                        p = rescale(v.inverse(probs[j:j + 1]), (h, w))
                        total += p[0]
                        n += 1
        return total / n

    def tile_norms(self, image: np.ndarray, members=None) -> List[Mapping[str, Any]]:
        """Each member's normalisation numbers for this whole tile (its mode's, see
        glacier_runtime/normalize.py): computed once, applied to every window and block."""
        return [tile_stats(image, m.stats) for m in (self.members if members is None else members)]

    def predict_proba(self, image: np.ndarray, views=None, scales=None, members=None,
                      norms: Optional[Sequence[Mapping[str, Any]]] = None) -> np.ndarray:
        """(C, H, W) raw tile -> (K, H, W) merged class probabilities. ``norms``: the
        members' numbers of the tile ``image`` is a block of (default: of ``image``)."""
        if image.ndim != 3:
            raise ValueError(f"expected a (C, H, W) tile, got shape {image.shape}")
        views = self.views if views is None else views
        scales = self.scales if scales is None else scales
        mems = self.members if members is None else members
        weights = self._member_weights() if members is None else [1.0 / len(mems)] * len(mems)
        stride = int(self.cfg.stride)
        _, H, W = image.shape
        workers = self._workers(mems)
        norms = self.tile_norms(image, mems) if norms is None else norms
        # normalisation is per pixel, so padding the raw tile once and normalising each window
        # per member equals padding each member's normalised tile (and holds one tile, not M)
        raw, _ = pad_to_multiple(image, stride)
        hp, wp = raw.shape[1:]
        window = max(stride, int(self.cfg.window) // stride * stride)
        plan = plan_windows(hp, wp, window, float(self.cfg.overlap))
        wh, ww = plan[0][2:]  # every window of a plan has one size
        wmap = blend_weight(wh, ww) if len(plan) > 1 else None
        k = mems[0].n_classes
        if len(plan) == 1 and workers > 1:  # the common case: one window, no blending buffers
            wins = [apply_stats(raw, n) for n in norms]
            probs = self._items_proba(mems, weights, wins, views, scales, workers) / np.float32(sum(weights))
            return probs[:, :H, :W]
        acc = np.zeros((k, hp, wp), np.float32)
        norm = np.zeros((hp, wp), np.float32)
        for (y0, x0, wh, ww) in plan:
            wins = [apply_stats(raw[:, y0:y0 + wh, x0:x0 + ww], n) for n in norms]
            if workers > 1:
                p = self._items_proba(mems, weights, wins, views, scales, workers)
            else:
                p = np.zeros((k, wh, ww), np.float32)
                for member, mw, win in zip(mems, weights, wins):
                    xt = torch.from_numpy(np.ascontiguousarray(win))[None]
                    p += mw * self._views_proba(member, xt, views, scales).numpy()
            wt = np.ones((wh, ww), np.float32) if wmap is None else wmap
            acc[:, y0:y0 + wh, x0:x0 + ww] += p * wt
            norm[y0:y0 + wh, x0:x0 + ww] += float(sum(weights)) * wt
        probs = acc / np.maximum(norm, 1e-12)
        return probs[:, :H, :W]

    def masked(self, image: np.ndarray) -> Optional[np.ndarray]:
        """Pixels zero in every band: the masked area of the competition's tiles."""
        if not self.cfg.masked_background:
            return None
        m = masked_pixels(image)
        return m if m.any() else None

    def decide(self, probs: np.ndarray, masked: Optional[np.ndarray] = None) -> np.ndarray:
        """Probabilities -> class ids: argmax of log p + bias, masked pixels to background,
        then post-processing."""
        ids = decide(probs, self.bias)
        if masked is not None:
            ids[masked] = 0
        return postprocess.apply(ids, self.rules, self.n_classes)

    @staticmethod
    def masked_to_background(probs: np.ndarray, masked: Optional[np.ndarray]) -> np.ndarray:
        """Probabilities as ``decide`` will treat them: masked pixels certain background.
        Saved out-of-fold arrays go through this once, so their argmax (OOF MCC, bias
        tuning) needs no image and no second application of the rule."""
        if masked is None:
            return probs
        out = probs.copy()
        out[:, masked] = 0.0
        out[0, masked] = 1.0
        return out

    def refine(self, probs: np.ndarray, image: np.ndarray, norm: Optional[Mapping[str, Any]] = None) -> np.ndarray:
        """The CRF step (when configured): masked pixels certain background first (as in
        the saved out-of-fold probabilities the tuner judges it on), the tile's bands,
        normalised with the first member's statistics, as the appearance term."""
        if self.crf is None:
            return probs
        probs = self.masked_to_background(probs, self.masked(image))
        norm = tile_stats(image, self.members[0].stats) if norm is None else norm
        return crf_refine(probs, apply_stats(image, norm), self.crf)

    def predict_ids(self, image: np.ndarray, views=None, scales=None, members=None) -> np.ndarray:
        """(C, H, W) raw tile -> (H, W) class ids. Tiles larger than ``block`` on a side go
        block by block (each with a context margin), so the working memory beyond the tile
        itself and its uint8 result is that of one block, whatever the tile's size."""
        _, H, W = image.shape
        block = int(self.cfg.block or 0)
        if block <= 0 or (H <= block and W <= block):
            probs = self.refine(self.predict_proba(image, views, scales, members), image)
            return self.decide(probs, self.masked(image))
        margin = self.block_margin()
        ids = np.zeros((H, W), np.uint8)
        mems = self.members if members is None else members
        norms = self.tile_norms(image, mems)  # the whole tile's numbers, not each block's
        first = tile_stats(image, self.members[0].stats) if self.crf is not None else None
        for (y0, y1, x0, x1), (ya, yb, xa, xb) in plan_blocks(H, W, block, margin):
            ids[y0:y1, x0:x1] = self.block_ids(image[:, ya:yb, xa:xb], (y0 - ya, y1 - ya, x0 - xa, x1 - xa), norms,
                                               first, views, scales, members)
        return postprocess.apply(ids, self.rules, self.n_classes)

    def block_margin(self) -> int:
        """Context (pixels) around each block of a tile or scene predicted block by block."""
        stride = int(self.cfg.stride)
        return max(stride, int(self.cfg.window) // 8 // stride * stride)

    def block_ids(self, crop: np.ndarray, core: Tuple[int, int, int, int], norms: Sequence[Mapping[str, Any]],
                  first: Optional[Mapping[str, Any]] = None, views=None, scales=None, members=None) -> np.ndarray:
        """Class ids (before post-processing) of the ``core`` (y0, y1, x0, x1 in ``crop``'s
        frame) of a block cut with its context margin from a larger tile or scene. ``norms``:
        the members' numbers of the whole tile (:meth:`tile_norms`); ``first``: the first
        member's, for the CRF."""
        probs = self.refine(self.predict_proba(crop, views, scales, members, norms), crop, first)
        y0, y1, x0, x1 = core
        ids = decide(probs, self.bias)[y0:y1, x0:x1]
        if self.cfg.masked_background:
            ids[masked_pixels(crop[:, y0:y1, x0:x1])] = 0
        return ids

    def to_pixels(self, ids: np.ndarray) -> np.ndarray:
        return self.class_values[ids]

    def predict_pixels_safe(self, image: np.ndarray, name: str = "tile"):
        """Never raises: full settings, then one view/scale, then one member, then background.

        Returns (uint8 pixel mask, note) where note says which fallback was used ('' if none).
        """
        H, W = image.shape[-2:]
        attempts = [
            ("full", {}),
            ("identity view only", {"views": resolve_views("none"), "scales": [1.0]}),
            ("first member, identity view", {"views": resolve_views("none"), "scales": [1.0], "members": self.members[:1]}),
        ]
        for label, kw in attempts:
            try:
                ids = self.predict_ids(image, **kw)
                note = "" if label == "full" else f"fallback: {label}"
                if note:
                    log.warning("%s: used %s", name, note)
                return self.to_pixels(ids), note
            except Exception as exc:  # noqa: BLE001 - one bad tile must not abort the run
                log.warning("%s: prediction (%s) failed: %s", name, label, exc)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        log.warning("%s: writing background", name)
        return np.zeros((H, W), np.uint8), "fallback: background"


def _view_forward_np(view, arr: np.ndarray) -> np.ndarray:
    """``view.forward`` on a (K, H, W) numpy array as a strided view (no copy), so that adding
    a model output in the view's frame to it adds the inverse-transformed output to ``arr``."""
    if view.flip:
        arr = arr[:, :, ::-1]
    if view.k:
        arr = np.rot90(arr, view.k, axes=(1, 2))
    return arr


def load_payload(path) -> Dict[str, Any]:
    """Load a model.pth payload (a path or a binary file object) with
    ``torch.load(weights_only=True)`` on any torch >= 2.0; never a full unpickle: a file that
    needs one is refused (:class:`~.safeload.UnsafeFileError`, naming it)."""
    payload = safe_load(path, "model payload", "rebuild the bundle with `glacier-submit build`")
    if not isinstance(payload, dict) or "members" not in payload:
        raise UnsafeFileError(f"{path} is not a glacier model payload (no 'members'); "
                              "rebuild the bundle with `glacier-submit build`")
    return payload
