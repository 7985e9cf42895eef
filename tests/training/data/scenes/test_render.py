"""Radiometry: Landsat-8 Collection-2 DNs against the published scaling by hand, sky light in
cast shadows, the effects that switch radiometry."""
import math

import numpy as np

from training.data.scenes.regions import ALL_ON, TRAIN_REGION
from training.data.scenes.render import DIFFUSE, illumination, sensor, to_reflectance


def test_dns_follow_the_landsat_scaling():
    refl = np.full((4, 8, 8), 0.3, np.float32)
    temp = np.full((8, 8), 270.0, np.float32)
    effects = ALL_ON.off("calibration").off("psf")
    region = TRAIN_REGION.__class__(noise=0.0)
    dn = sensor(np.random.default_rng(0), refl, temp, 1.0, region, effects, 1, 1, 8)
    assert np.allclose(dn[:4], round((0.3 + 0.1) / 2.0e-5))          # reflectance = DN * 2e-5 - 0.1
    radiance = 774.8853 / (math.exp(1321.0789 / 270.0) - 1.0)          # TIRS band 10 K1, K2
    assert np.allclose(dn[4], round((radiance - 0.1) / 3.342e-4))
    back = to_reflectance(dn)
    assert np.allclose(back["reflectance"], 0.3, atol=1e-4) and np.allclose(back["temperature"], 270.0, atol=0.01)


def test_cast_shadows_get_sky_light_only():
    shade = np.array([[1.2, 1.2], [0.5, 0.0]], np.float32)
    shadow = np.array([[False, True], [False, False]])
    got = illumination(shade, shadow, topo=True, cast=True)
    want = DIFFUSE + (1 - DIFFUSE) * np.array([[1.2, 0.0], [0.5, 0.0]], np.float32)
    assert np.allclose(got, want)
    assert np.allclose(illumination(shade, shadow, topo=False, cast=False), 1.0)
