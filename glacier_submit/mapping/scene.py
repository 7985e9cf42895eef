"""A scene to map: its band GeoTIFFs found by role, checked to be co-registered.

Two layouts are read:

- a **Landsat Collection 2 scene folder** as USGS distributes it: ``LC08_L1TP_140041_
  20210101_20210308_02_T1_B2.TIF`` (Level-1), ``..._L2SP_..._SR_B2.TIF`` / ``_ST_B10.TIF``
  (Level-2), ``..._QA_PIXEL.TIF`` and ``..._MTL.txt``. The sensor comes from the name
  (LC08/LC09: Landsat 8/9 OLI-TIRS; LE07: ETM+; LT04/LT05: TM, whose bands have ETM+'s
  roles) and each band's role from the band registry (training/bands.py): an L8 ``B6`` is
  SWIR-1, an L7 ``B6`` thermal.
- **Band files named by role**: ``blue.tif green.tif red.tif swir1.tif tir.tif`` (any of
  the registry's roles), optionally ``cloud.tif`` (non-zero = cloud).

A member's bands are matched by name when the scene is of the member's sensor, else by
role; a missing role is an error naming what the scene has.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from training.bands import ROLES, SENSORS, get_band

#: Landsat Collection 2 product name -> band registry sensor (TM bands have ETM+'s roles)
LANDSAT_SENSORS = {"LC08": "L8", "LC09": "L8", "LE07": "L7", "LT05": "L7", "LT04": "L7"}
_LANDSAT = re.compile(r"^(?P<id>(?P<mission>L[COTE]0\d)_(?P<level>L\w{3})_\d{6}_\d{8}_\d{8}_\d{2}_\w{2})_"
                      r"(?:(?:SR|ST)_)?(?P<band>B\d+(?:_VCID_[12])?|QA_PIXEL|MTL)\.(?:TIF|TIFF|txt)$", re.IGNORECASE)
#: Collection 2 file band names that the registry spells differently (ETM+'s two thermal gains)
_C2_NAMES = {"B6_VCID_1": "B6_low", "B6_VCID_2": "B6_high"}
LEVELS = {"L1TP": "Level-1 (calibrated DN)", "L1GT": "Level-1 (calibrated DN)", "L1GS": "Level-1 (calibrated DN)",
          "L2SP": "Level-2 (scaled surface reflectance / temperature)",
          "L2SR": "Level-2 (scaled surface reflectance)"}


class SceneError(ValueError):
    """A scene that cannot be mapped (the message names the file and the fix)."""


@dataclass
class Scene:
    name: str
    folder: str
    sensor: Optional[str]                 # band registry sensor, None for role-named files
    product: str                          # e.g. "L1TP", or "role-named"
    bands: Dict[str, str]                 # band name (Landsat) or role -> path
    roles: Dict[str, str]                 # band key -> role
    qa_pixel: Optional[str] = None        # Landsat QA_PIXEL (bit 3 cloud, bit 1 dilated cloud)
    cloud: Optional[str] = None           # role-named: non-zero = cloud
    mtl: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def level(self) -> str:
        return LEVELS.get(self.product.upper(), self.product)

    def paths_for(self, sensor: str, names: Sequence[str]) -> List[Tuple[str, str]]:
        """(band key, path) of the scene for each of a member's bands (``sensor``: the
        member's): by name when the sensors agree, else by role (the lowest-numbered band of
        that role, e.g. L8 B10 of B10/B11)."""
        out = []
        for name in names:
            want = get_band(sensor, name)
            if self.sensor == sensor and name in self.bands:
                out.append((name, self.bands[name]))
                continue
            hits = sorted((k for k, r in self.roles.items() if r == want.role), key=_band_order)
            if not hits:
                have = ", ".join(f"{k} ({r})" for k, r in sorted(self.roles.items(), key=lambda kv: _band_order(kv[0])))
                raise SceneError(f"{self.folder}: the members need {want} (role {want.role}), which this scene does not "
                                 f"have; it has {have or 'no band files'}. Add the {want.role} band's GeoTIFF"
                                 + ("" if self.sensor else f" as {want.role}.tif"))
            out.append((hits[0], self.bands[hits[0]]))
        return out


def _band_order(key: str):
    """Band number, then ETM+'s low-gain thermal before the high-gain one (it saturates less)."""
    m = re.match(r"B(\d+)", key)
    return (int(m.group(1)), key.endswith("_high"), key) if m else (10 ** 6, False, key)


def find_scene(folder: str) -> Scene:
    """The scene in ``folder`` (a Landsat C2 folder or role-named band files)."""
    if not os.path.isdir(folder):
        raise SceneError(f"{folder}: not a folder; give a Landsat scene folder or a folder of band files named by role "
                         "(blue.tif, green.tif, red.tif, swir1.tif, tir.tif)")
    files = sorted(os.listdir(folder))
    landsat = [(f, _LANDSAT.match(f)) for f in files]
    landsat = [(f, m) for f, m in landsat if m]
    if landsat:
        return _landsat_scene(folder, landsat)
    return _role_scene(folder, files)


def _landsat_scene(folder: str, hits) -> Scene:
    ids = sorted({m.group("id") for _, m in hits})
    if len(ids) > 1:
        raise SceneError(f"{folder} holds files of {len(ids)} Landsat scenes ({', '.join(ids[:3])}...); give each "
                         "scene its own folder")
    first = hits[0][1]
    mission, level = first.group("mission").upper(), first.group("level").upper()
    sensor = LANDSAT_SENSORS.get(mission)
    if sensor is None:
        raise SceneError(f"{folder}: Landsat mission {mission} is not in the band registry (known: "
                         f"{', '.join(sorted(LANDSAT_SENSORS))})")
    bands, roles, qa, mtl, notes = {}, {}, None, None, []
    for f, m in hits:
        band, path = m.group("band").upper(), os.path.join(folder, f)
        band = _C2_NAMES.get(band, band)
        if band == "QA_PIXEL":
            qa = path
        elif band == "MTL":
            mtl = path
        elif band in SENSORS[sensor]:
            bands[band], roles[band] = path, SENSORS[sensor][band].role
        else:
            notes.append(f"{f}: band {band} is not in the {sensor} registry; ignored")
    return Scene(ids[0], folder, sensor, level, bands, roles, qa_pixel=qa, mtl=mtl, notes=notes)


def _role_scene(folder: str, files: Sequence[str]) -> Scene:
    bands, roles, cloud = {}, {}, None
    for f in files:
        stem, ext = os.path.splitext(f)
        if ext.lower() not in (".tif", ".tiff"):
            continue
        key = stem.lower()
        if key == "cloud":
            cloud = os.path.join(folder, f)
        elif key in ROLES:
            bands[key], roles[key] = os.path.join(folder, f), key
    if not bands:
        raise SceneError(f"{folder}: no band files found: expected a Landsat Collection 2 scene (e.g. "
                         "LC08_L1TP_140041_20210101_20210308_02_T1_B2.TIF) or files named by role "
                         f"({', '.join(r + '.tif' for r in ('blue', 'green', 'red', 'swir1', 'tir'))})")
    name = os.path.basename(os.path.abspath(folder))  # "." and ".." name the folder they are
    if not name or name.startswith("."):
        raise SceneError(f"{folder}: a scene folder of band files needs a name that does not start with '.' "
                         "(its outputs go to OUT/<name>/); rename or move it")
    return Scene(name, folder, None, "role-named", bands, roles, cloud=cloud)
