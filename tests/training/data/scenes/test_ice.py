"""Glaciers: the region's glacier share through the snow line (the labelled share: the
inventory's), debris on ice below it, lakes never on clean ice; the inventory larger than the
ice the image shows."""
import numpy as np

from training.data.scenes.ice import make_ice
from training.data.scenes.regions import REGIONS
from training.data.scenes.terrain import make_terrain


def test_share_debris_and_lakes_follow_the_rules():
    region = REGIONS["khumbu"]
    t = make_terrain(np.random.default_rng(1), (768, 768), 0.75, region)
    ice = make_ice(np.random.default_rng(2), t, 0.75, region, 9)
    ice_all = ice.glacier | ice.debris | ice.firn
    assert ice.inventory is None
    assert region.glacier_share - 0.15 < ice_all.mean() < region.glacier_share - 0.03  # the image's ice: the higher line
    assert (t.elev[ice.debris] < ice.ela).all()                  # debris only on the tongues below the line
    assert not (ice.lakes & ice.glacier).any() and not (ice.lakes & ice.firn).any()
    assert not (ice.frozen & ~ice.lakes).any() and not (ice.frozen & ice.turbid).any()
    assert (ice.firn <= (t.elev > ice.ela)).all()


def test_inventory_is_the_region_share_and_contains_the_image_ice():
    region = REGIONS["khumbu"]
    t = make_terrain(np.random.default_rng(1), (768, 768), 0.75, region)
    plain = make_ice(np.random.default_rng(2), t, 0.75, region, 9)
    ice = make_ice(np.random.default_rng(2), t, 0.75, region, 9, inventory_rng=np.random.default_rng(3))
    for name in ("glacier", "debris", "lakes", "firn"):  # the inventory changes nothing the image shows
        assert np.array_equal(getattr(plain, name), getattr(ice, name))
    inv = ice.inventory
    assert inv.dtype == np.uint8 and set(np.unique(inv)) <= {0, 1, 2}
    assert abs((inv > 0).mean() - region.glacier_share) < 0.03
    image_ice = ice.glacier | ice.debris | ice.firn
    assert (inv > 0)[image_ice].mean() > 0.95            # glaciers were larger at the inventory's date
    assert (inv > 0).sum() > 1.1 * image_ice.sum()
    debris_share = (inv == 2).sum() / (inv > 0).sum()    # its own debris mapping, near the region's fraction
    assert 0.5 * region.debris_fraction < debris_share < 1.5 * region.debris_fraction
