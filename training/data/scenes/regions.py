"""Regions and the physical effects of the synthetic scenes.

A :class:`Region` is one mountain range at one date: its terrain, sun, snow line (through
its glacier share), debris and lake frequency, clouds, haze and the sensor's calibration.
:class:`Effects` switches each effect that makes the task hard, one by one, so the
generator's difficulty can be explained (``benchmarks/generator_ablation.py``).

The five named regions differ as Himalayan ranges do; ``TRAIN_REGION`` (the default
training set) and ``UNSEEN_REGION`` (the default unseen split) are two of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Region:
    name: str = "khumbu"
    # terrain
    base_elevation_m: float = 3600.0
    relief_m: float = 3400.0
    roughness: float = 1.0
    carve_m: float = 450.0
    # sun (scene centre, at the acquisition time)
    sun_azimuth: float = 140.0
    sun_elevation: float = 42.0
    # ice: the glacier share fixes the snow line (ELA) on this terrain
    glacier_share: float = 0.30          # clean + debris-covered ice, of all pixels
    balance_gradient: float = 0.006      # per metre above/below the ELA
    max_accumulation: float = 3.0
    max_ablation: float = 3.0
    max_ice_slope: float = 32.0          # degrees: steeper walls stay bare above the ELA
    min_basin_cells: int = 12            # coarse cells (240 m) draining through a cell for it to hold ice
    debris_fraction: float = 0.19        # of the ice
    debris_depth_m: float = 450.0        # how far below the ELA debris cover is complete
    # lakes (per tile of 512 x 512 pixels)
    proglacial_lakes_per_tile: float = 0.5
    ponds_per_tile: float = 0.35
    frozen_lake_share: float = 0.2
    turbid_lake_share: float = 0.3
    # snow, cloud, atmosphere, sensor
    seasonal_snow: float = 0.20          # share of the ice-free ground under seasonal snow
    snow_on_debris: float = 0.08         # share of the debris dusted with snow
    cloud_tiles: float = 0.25            # share of tiles with cloud
    haze: float = 0.03                   # path reflectance in the blue band (falls with wavelength)
    gain: float = 1.0                    # the sensor's calibration against the nominal one
    offset: float = 0.0                  # reflectance offset (calibration, atmosphere)
    thermal_offset_k: float = 0.0        # season and time of day
    debris_thermal_k: float = 1.0        # debris this much cooler than bare rock (weak: thin debris over ice)
    inventory_ela_shift_m: float = 100.0  # the snow line this much lower at the labels' inventory date (larger glaciers)
    label_scale: int = 2                 # labels drawn on imagery this much coarser, then resampled
    misregistration_px: float = 1.5      # labels shifted against the bands by up to this much
    noise: float = 1.0


REGIONS: Dict[str, Region] = {r.name: r for r in (
    Region(),  # khumbu: debris-covered tongues, many ponds and proglacial lakes
    Region("lahaul", base_elevation_m=3300.0, relief_m=3100.0, roughness=1.15, sun_azimuth=150.0,
           sun_elevation=48.0, glacier_share=0.32, debris_fraction=0.10, debris_depth_m=600.0,
           proglacial_lakes_per_tile=0.35, ponds_per_tile=0.2, seasonal_snow=0.24, snow_on_debris=0.15,
           cloud_tiles=0.2, haze=0.02, gain=1.04, offset=0.005, thermal_offset_k=-3.0, label_scale=2,
           misregistration_px=1.0),
    Region("karakoram", base_elevation_m=3900.0, relief_m=4000.0, roughness=1.3, carve_m=600.0,
           sun_azimuth=128.0, sun_elevation=37.0, glacier_share=0.28, debris_fraction=0.22, debris_depth_m=350.0,
           proglacial_lakes_per_tile=0.25, ponds_per_tile=0.35, frozen_lake_share=0.4, seasonal_snow=0.18,
           cloud_tiles=0.15, haze=0.015, gain=0.95, offset=-0.004, thermal_offset_k=-6.0, debris_thermal_k=0.8,
           label_scale=3, misregistration_px=2.0),
    Region("bhutan", base_elevation_m=3400.0, relief_m=3000.0, roughness=0.9, sun_azimuth=155.0,
           sun_elevation=52.0, glacier_share=0.27, debris_fraction=0.14, proglacial_lakes_per_tile=0.9,
           ponds_per_tile=0.6, turbid_lake_share=0.5, seasonal_snow=0.14, cloud_tiles=0.45, haze=0.05,
           gain=1.07, offset=0.01, thermal_offset_k=3.0, debris_thermal_k=1.3, noise=1.3),
    Region("tienshan", base_elevation_m=3000.0, relief_m=2900.0, roughness=0.8, carve_m=380.0,
           sun_azimuth=160.0, sun_elevation=55.0, glacier_share=0.31, debris_fraction=0.07, debris_depth_m=700.0,
           proglacial_lakes_per_tile=0.3, ponds_per_tile=0.1, frozen_lake_share=0.35, seasonal_snow=0.26,
           snow_on_debris=0.2, cloud_tiles=0.1, haze=0.01, gain=0.92, offset=-0.006, thermal_offset_k=-8.0,
           debris_thermal_k=1.6, label_scale=2, misregistration_px=1.0, noise=0.9),
)}
TRAIN_REGION = REGIONS["khumbu"]
UNSEEN_REGION = REGIONS["bhutan"]


@dataclass(frozen=True)
class Effects:
    """Each physical effect that makes the task hard, on by default; ``off(name)`` gives the
    generator without it (the ablation of ``benchmarks/generator_ablation.py``)."""
    inventory_labels: bool = True   # labels from an older glacier inventory (larger glaciers, headwalls, generalised)
    label_resampling: bool = True   # outlines drawn on coarser imagery and resampled
    misregistration: bool = True    # labels shifted against the bands by a pixel or two
    label_omission: bool = True     # small debris patches and ponds not drawn
    psf: bool = True                # mixed pixels: the sensor's point-spread function
    topo_shading: bool = True       # illumination by slope and aspect
    cast_shadows: bool = True       # terrain shadows under the region's sun
    clouds: bool = True             # cloud and cloud shadow
    snow: bool = True               # seasonal snow on rock and snow on debris
    lake_variants: bool = True      # frozen and turbid lakes
    weak_debris_thermal: bool = True  # debris only weakly cooler than rock (off: 8 K cooler)
    calibration: bool = True        # the region's gain, offset, haze and thermal offset

    @classmethod
    def names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    def off(self, name: str) -> "Effects":
        if name not in self.names():
            raise ValueError(f"unknown effect {name!r}; effects: {self.names()}")
        return dataclasses.replace(self, **{name: False})


ALL_ON = Effects()
