"""Inference settings: the defaults, None meaning the default except for ``bias`` (where None
means no bias), unknown keys an error naming them, and the plain dict stored in model.pth."""
import json
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from glacier_runtime.settings import InferenceSettings

DEFAULTS = {"tta": "none", "scales": [1.0], "merge": "mean", "bias": None, "window": 1024, "block": 2048,
            "overlap": 0.25, "max_batch": "auto", "workers": "auto", "stride": 32, "postprocess": [],
            "masked_background": True, "crf": None, "adapt": None}


def test_defaults():
    assert InferenceSettings().to_dict() == DEFAULTS
    assert InferenceSettings.from_dict(None) == InferenceSettings() == InferenceSettings.from_dict({})
    assert InferenceSettings.names() == list(DEFAULTS)


def test_none_means_the_default():
    got = InferenceSettings.from_dict({k: None for k in DEFAULTS})
    assert got == InferenceSettings()
    got = InferenceSettings.from_dict({"tta": None, "window": 256, "bias": [0.0, 0.5, 0.0, 1.0], "crf": None})
    assert got.to_dict() == {**DEFAULTS, "window": 256, "bias": [0.0, 0.5, 0.0, 1.0]}


def test_none_for_bias_is_a_value_not_the_default():
    """Seen through a subclass whose default bias is not None: None there removes the bias,
    while None for any other key still gives that key's default."""
    @dataclass
    class WithBias(InferenceSettings):
        bias: Optional[List[float]] = field(default_factory=lambda: [0.0, 1.0])
        window: int = 512

    assert WithBias.from_dict({}).bias == [0.0, 1.0]
    assert WithBias.from_dict({"bias": None}).bias is None
    assert WithBias.from_dict({"window": None}).window == 512
    stored, override = {"bias": [0.0, 2.0], "tta": "d4"}, {"bias": None, "tta": None}
    merged = WithBias.from_dict({**stored, **override})
    assert merged.bias is None and merged.tta == "none"


def test_unknown_keys_are_named():
    with pytest.raises(ValueError) as exc:
        InferenceSettings.from_dict({"tta": "d4", "windw": 512, "blok": 0})
    msg = str(exc.value)
    assert "['blok', 'windw']" in msg and "known" in msg and "'window'" in msg


def test_to_dict_round_trip_with_plain_types():
    s = InferenceSettings(tta=["identity", "hflip"], scales=[0.75, 1.0], merge="weighted", bias=[0.0, 0.1, 0.2, 0.3],
                          window=512, postprocess=[{"rule": "min_area", "class": 3, "min_area": 12}],
                          crf={"iterations": 2, "window": 3}, masked_background=False)
    d = s.to_dict()
    assert InferenceSettings.from_dict(d) == s
    assert json.loads(json.dumps(d)) == d  # nothing but plain types


def test_default_lists_are_not_shared():
    a = InferenceSettings()
    a.scales.append(2.0)
    a.postprocess.append({"rule": "fill_holes", "class": 1})
    assert InferenceSettings().scales == [1.0] and InferenceSettings().postprocess == []
