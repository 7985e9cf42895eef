"""Class map shared by training, the runtime and the bundle."""
from __future__ import annotations

from typing import Dict, Tuple

CLASS_NAMES: Tuple[str, ...] = ("background", "glacier", "debris", "lake")
#: Pixel value written for each class id in the competition's masks.
CLASS_VALUES: Tuple[int, ...] = (0, 85, 170, 255)
BINARY_CLASS_NAMES: Tuple[str, ...] = ("background", "glacier")
BINARY_CLASS_VALUES: Tuple[int, ...] = (0, 255)


def class_map(binary: bool = False) -> Dict[str, list]:
    """The class map stored in checkpoints and manifests."""
    if binary:
        return {"names": list(BINARY_CLASS_NAMES), "values": list(BINARY_CLASS_VALUES)}
    return {"names": list(CLASS_NAMES), "values": list(CLASS_VALUES)}
