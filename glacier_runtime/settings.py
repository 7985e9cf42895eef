"""Inference settings: one dataclass with the defaults in one place, used by the predictor,
``glacier-submit build`` (stored in model.pth as the plain dict :meth:`to_dict` gives),
the CLI and ``evaluate``'s ablations.

A stored or overriding dict is read by :meth:`InferenceSettings.from_dict`: a key with the
value None keeps the default, except ``bias``, where None means no bias. Unknown keys are
an error naming the known ones. Standard library only (Python 3.9): this module ships
inside the bundle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

#: keys whose None is a value, not "use the default"
NONE_IS_A_VALUE = ("bias",)


@dataclass
class InferenceSettings:
    tta: Any = "none"              # preset name or list of D4 view names (glacier_runtime/tta.py)
    scales: List[float] = field(default_factory=lambda: [1.0])
    merge: str = "mean"            # mean | weighted (by member weight)
    bias: Optional[List[float]] = None  # per-class additive bias on log-probabilities
    window: int = 1024             # tiles larger than this (after padding) are windowed
    block: int = 2048              # tiles larger than this go block by block (bounded memory, docs/DATA.md)
    overlap: float = 0.25
    # views per forward pass: auto = 2 torch-CPU, 1 ORT-CPU (measured on CPU,
    # benchmarks/inference_speed.py); 8 on CUDA (a default, not measured on a GPU)
    max_batch: Any = "auto"
    # CPU: work items (member x view x scale) run this many at once, each with
    # cores // workers intra-op threads; auto = one per core (2..4), 1 on CUDA
    workers: Any = "auto"
    stride: int = 32
    postprocess: List[Dict[str, Any]] = field(default_factory=list)
    masked_background: bool = True  # pixels that are 0 in every band (masked scene edge) -> background
    crf: Optional[Dict[str, Any]] = None  # CRF refinement of the merged probabilities (glacier_runtime/crf.py)
    # test-time adaptation before predicting a folder: "bn" = each member's batch-norm statistics
    # re-estimated on the test tiles (glacier_runtime/adapt.py); None = off
    adapt: Optional[str] = None

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]] = None) -> "InferenceSettings":
        """The defaults with ``values`` applied (a stored payload's settings merged with any
        overrides first: a None there means the default, except for ``bias``)."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown inference settings {unknown}; known: {cls.names()}")
        return cls(**{k: v for k, v in values.items() if v is not None or k in NONE_IS_A_VALUE})

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (model.pth loads with ``weights_only=True``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
