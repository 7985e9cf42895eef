"""The class map stored in checkpoints and manifests: names and the pixel values of the
competition's masks."""
from glacier_runtime.classes import class_map


def test_multiclass_and_binary_maps():
    assert class_map() == {"names": ["background", "glacier", "debris", "lake"], "values": [0, 85, 170, 255]}
    assert class_map(binary=True) == {"names": ["background", "glacier"], "values": [0, 255]}


def test_each_call_returns_its_own_lists():
    a = class_map()
    a["names"].append("snow")
    a["values"][0] = 1
    assert class_map() == {"names": ["background", "glacier", "debris", "lake"], "values": [0, 85, 170, 255]}
