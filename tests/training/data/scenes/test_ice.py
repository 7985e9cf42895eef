"""Glaciers: the region's glacier share through the snow line, debris on ice below it, lakes
never on clean ice."""
import numpy as np

from training.data.scenes.ice import make_ice
from training.data.scenes.regions import REGIONS
from training.data.scenes.terrain import make_terrain


def test_share_debris_and_lakes_follow_the_rules():
    region = REGIONS["khumbu"]
    t = make_terrain(np.random.default_rng(1), (768, 768), 0.75, region)
    ice = make_ice(np.random.default_rng(2), t, 0.75, region, 9)
    ice_all = ice.glacier | ice.debris | ice.firn
    assert abs(ice_all.mean() - region.glacier_share) < 0.05
    assert (t.elev[ice.debris] < ice.ela).all()                  # debris only on the tongues below the line
    assert not (ice.lakes & ice.glacier).any() and not (ice.lakes & ice.firn).any()
    assert not (ice.frozen & ~ice.lakes).any() and not (ice.frozen & ice.turbid).any()
    assert (ice.firn <= (t.elev > ice.ela)).all()
