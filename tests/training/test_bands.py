import pytest

from training import bands


def test_competition_bands_map_to_hkh_by_role():
    assert bands.map_bands("L8", bands.COMPETITION_BANDS, "L7") == ["B1", "B2", "B3", "B5", "B6_high"]


def test_roles_of_competition_set():
    assert bands.roles("L8", bands.COMPETITION_BANDS) == ["blue", "green", "red", "swir1", "tir"]


def test_swir_onto_thermal_is_an_error_naming_both_bands():
    with pytest.raises(bands.BandMappingError) as exc:
        bands.map_bands("L8", ["B2", "B3", "B4", "B6", "B10"], "L7", ["B1", "B2", "B3", "B6_low", "B6_high"])
    msg = str(exc.value)
    assert "L8:B6 (swir1)" in msg and "L7:B6_low (tir)" in msg and "B5" in msg


def test_role_mismatch_allowed_when_explicit():
    out = bands.map_bands("L8", ["B6"], "L7", ["B6_low"], allow_role_mismatch=True)
    assert out == ["B6_low"]


@pytest.mark.parametrize("sensor,name", [("L8", "B99"), ("L9", "B2")])
def test_unknown_band_or_sensor(sensor, name):
    with pytest.raises(bands.BandMappingError):
        bands.select(sensor, [name])


def test_duplicates_and_length_mismatch():
    with pytest.raises(bands.BandMappingError, match="duplicate"):
        bands.select("L8", ["B2", "B2"])
    with pytest.raises(bands.BandMappingError, match="cannot pair"):
        bands.map_bands("L8", ["B2", "B3"], "L7", ["B1"])
