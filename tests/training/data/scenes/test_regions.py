"""Regions and effects: five named regions that differ, effects switched off one by one."""
import pytest

from training.data.scenes.regions import ALL_ON, REGIONS, TRAIN_REGION, UNSEEN_REGION, Effects


def test_five_regions_and_the_default_pair():
    assert len(REGIONS) >= 5 and TRAIN_REGION.name != UNSEEN_REGION.name
    fields = ("sun_azimuth", "glacier_share", "debris_fraction", "seasonal_snow", "haze", "gain", "proglacial_lakes_per_tile")
    for f in fields:  # each named parameter takes several values across the regions
        assert len({getattr(r, f) for r in REGIONS.values()}) >= 3, f


def test_effects_off():
    assert all(getattr(ALL_ON, n) for n in Effects.names())
    off = ALL_ON.off("clouds")
    assert not off.clouds and all(getattr(off, n) for n in Effects.names() if n != "clouds")
    with pytest.raises(ValueError, match="unknown effect 'cloudz'"):
        ALL_ON.off("cloudz")
