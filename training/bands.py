"""Band registry: sensor -> band name -> physical role and wavelength.

Bands are selected by name, never by bare index, and mapping a band onto a band of
another role (SWIR-1 onto thermal, the slip in the seed system's HKH config) is an error
unless explicitly allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROLES = (
    "coastal", "blue", "green", "red", "nir", "swir1", "swir2", "tir", "pan", "cirrus",
    "qa", "index", "elevation", "slope",
)


@dataclass(frozen=True)
class Band:
    sensor: str
    name: str
    role: str
    wavelength_um: Optional[Tuple[float, float]] = None

    def __str__(self) -> str:
        return f"{self.sensor}:{self.name} ({self.role})"


def _sensor(name: str, rows: Sequence[Tuple[str, str, Optional[Tuple[float, float]]]]) -> Dict[str, Band]:
    out = {}
    for band, role, wl in rows:
        assert role in ROLES, role
        out[band] = Band(name, band, role, wl)
    return out


SENSORS: Dict[str, Dict[str, Band]] = {
    "L8": _sensor("L8", [
        ("B1", "coastal", (0.43, 0.45)), ("B2", "blue", (0.45, 0.51)), ("B3", "green", (0.53, 0.59)),
        ("B4", "red", (0.64, 0.67)), ("B5", "nir", (0.85, 0.88)), ("B6", "swir1", (1.57, 1.65)),
        ("B7", "swir2", (2.11, 2.29)), ("B8", "pan", (0.50, 0.68)), ("B9", "cirrus", (1.36, 1.38)),
        ("B10", "tir", (10.6, 11.19)), ("B11", "tir", (11.5, 12.51)), ("BQA", "qa", None),
    ]),
    "L7": _sensor("L7", [
        ("B1", "blue", (0.45, 0.52)), ("B2", "green", (0.52, 0.60)), ("B3", "red", (0.63, 0.69)),
        ("B4", "nir", (0.77, 0.90)), ("B5", "swir1", (1.55, 1.75)), ("B6_low", "tir", (10.4, 12.5)),
        ("B6_high", "tir", (10.4, 12.5)), ("B7", "swir2", (2.09, 2.35)), ("B8_pan", "pan", (0.52, 0.90)),
        ("BQA", "qa", None), ("NDVI", "index", None), ("NDSI", "index", None), ("NDWI", "index", None),
        ("elevation", "elevation", None), ("slope", "slope", None),
    ]),
}

# Names accepted for the sensors in configs.
SENSOR_ALIASES = {"l8": "L8", "landsat8": "L8", "oli": "L8", "l7": "L7", "landsat7": "L7", "etm+": "L7", "etm": "L7"}

#: The competition's bands, in the order of the folders ``glacier_runtime.tiles.BAND_FOLDERS``
#: (Band1..Band5) that hold them.
COMPETITION_SENSOR = "L8"
COMPETITION_BANDS: Tuple[str, ...] = ("B2", "B3", "B4", "B6", "B10")
#: HKH (Landsat-7) channel order of the extracted patches.
HKH_CHANNELS: Tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6_low", "B6_high", "B7", "B8_pan", "BQA",
    "NDVI", "NDSI", "NDWI", "elevation", "slope",
)
#: Preferred band of each role when several share it (thermal: high gain).
_PREFERRED = {("L7", "tir"): "B6_high", ("L8", "tir"): "B10"}


class BandMappingError(ValueError):
    """A band selection or mapping is unknown or crosses physical roles."""


def sensor_name(sensor: str) -> str:
    key = SENSOR_ALIASES.get(sensor.lower(), sensor)
    if key not in SENSORS:
        raise BandMappingError(f"unknown sensor {sensor!r}; known: {sorted(SENSORS)}")
    return key


def get_band(sensor: str, name: str) -> Band:
    s = sensor_name(sensor)
    if name not in SENSORS[s]:
        raise BandMappingError(f"{s} has no band {name!r}; its bands are {list(SENSORS[s])}")
    return SENSORS[s][name]


def select(sensor: str, names: Sequence[str]) -> List[Band]:
    """Resolve band names on one sensor; unknown or duplicate names are errors."""
    if len(set(names)) != len(names):
        raise BandMappingError(f"duplicate band names in {list(names)}")
    return [get_band(sensor, n) for n in names]


def roles(sensor: str, names: Sequence[str]) -> List[str]:
    return [b.role for b in select(sensor, names)]


def map_bands(
    src_sensor: str,
    src_names: Sequence[str],
    dst_sensor: str,
    dst_names: Optional[Sequence[str]] = None,
    allow_role_mismatch: bool = False,
) -> List[str]:
    """Map bands of one sensor onto another by physical role.

    Without ``dst_names`` each source band is matched to the destination band of the same
    role. With ``dst_names`` the explicit pairing is checked: a pair whose roles differ
    (e.g. L8 B6 swir1 -> L7 B6_low tir) raises, naming both bands, unless
    ``allow_role_mismatch``.
    """
    src = select(src_sensor, src_names)
    d = sensor_name(dst_sensor)
    if dst_names is None:
        out = []
        for band in src:
            candidates = [b for b in SENSORS[d].values() if b.role == band.role]
            if not candidates:
                raise BandMappingError(f"{band} has no band of role {band.role!r} on {d}")
            preferred = _PREFERRED.get((d, band.role))
            pick = next((b for b in candidates if b.name == preferred), candidates[0])
            out.append(pick.name)
        return out
    if len(dst_names) != len(src_names):
        raise BandMappingError(
            f"cannot pair {len(src_names)} bands {list(src_names)} with {len(dst_names)} bands {list(dst_names)}"
        )
    dst = select(d, dst_names)
    for a, b in zip(src, dst):
        if a.role != b.role and not allow_role_mismatch:
            raise BandMappingError(
                f"band mapping {a} -> {b} crosses roles ({a.role} vs {b.role}). "
                f"Use the {d} band of role {a.role!r}"
                f" ({', '.join(x.name for x in SENSORS[d].values() if x.role == a.role) or 'none'}),"
                " or set allow_role_mismatch: true if this is deliberate."
            )
    return [b.name for b in dst]
