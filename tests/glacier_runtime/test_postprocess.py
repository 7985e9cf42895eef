"""Post-processing rules against independent scipy.ndimage references: on worst-case random
masks (every pixel an independent class draw: thousands of components) at odd sizes, on
smooth blobs, and on blocky masks with specks; the presets as one chain."""
import cv2
import numpy as np
import pytest

from glacier_runtime import postprocess

from tests.helpers import ROOT, blobs, worst_case

ndi = pytest.importorskip("scipy.ndimage")
S8 = np.ones((3, 3), bool)


def ref_relabel(mask, cls, drop_fn):
    """Component by component, the textbook way: scipy labels, ring = dilation minus component."""
    out = mask.copy()
    lab, n = ndi.label(mask == cls, structure=S8)
    for i in range(1, n + 1):
        comp = lab == i
        if drop_fn(comp):
            ring = ndi.binary_dilation(comp, structure=S8) & ~comp
            vals = mask[ring]
            vals = vals[vals != cls]
            out[comp] = np.bincount(vals, minlength=4).argmax() if vals.size else 0
    return out


def ref_remove_small(mask, cls, min_area):
    return ref_relabel(mask, cls, lambda c: c.sum() < min_area)


def ref_lake_shape(mask, cls, min_area, min_width):
    dist = ndi.distance_transform_edt(np.pad(mask == cls, 1))[1:-1, 1:-1]
    return ref_relabel(mask, cls, lambda c: c.sum() < min_area or 2 * dist[c].max() < min_width)


def ref_fill_holes(mask, cls, max_area=None):
    holes = ndi.binary_fill_holes(mask == cls) & (mask != cls)
    lab, n = ndi.label(holes)  # 4-connected, as the rule's holes
    out = mask.copy()
    for i in range(1, n + 1):
        comp = lab == i
        if max_area is None or comp.sum() <= max_area:
            out[comp] = cls
    return out


def ref_debris(mask, debris=2, glacier=1, to=0):
    lab, n = ndi.label(mask == debris, structure=S8)
    near = ndi.binary_dilation(mask == glacier, structure=S8)
    out = mask.copy()
    for i in range(1, n + 1):
        if not (near & (lab == i)).any():
            out[lab == i] = to
    return out


SHAPES = [(1, 1), (1, 17), (13, 1), (3, 5), (31, 47), (67, 45), (101, 99)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_remove_small_random(shape, seed):
    m = worst_case(seed, shape)
    for cls, area in ((1, 5), (2, 3), (3, 12), (0, 2)):
        assert np.array_equal(postprocess.remove_small(m, cls, area), ref_remove_small(m, cls, area)), (cls, area)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_fill_holes_random(shape, seed):
    m = worst_case(seed, shape, p=(0.2, 0.6, 0.1, 0.1))
    for cls in (1, 2):
        for max_area in (None, 1, 3, 40):
            assert np.array_equal(postprocess.fill_holes(m, cls, max_area), ref_fill_holes(m, cls, max_area)), (cls, max_area)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_lake_shape_random(shape, seed):
    m = worst_case(seed, shape, p=(0.2, 0.2, 0.1, 0.5))  # many lake blobs, some wide
    for min_area, min_width in ((0, 3.0), (12, 3.0), (5, 0.0), (0, 2.5), (4, 4.0)):
        got = postprocess.lake_shape(m, 3, min_area, min_width)
        assert np.array_equal(got, ref_lake_shape(m, 3, min_area, min_width)), (min_area, min_width)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_debris_random(shape, seed):
    m = worst_case(seed, shape, p=(0.5, 0.1, 0.35, 0.05))
    assert np.array_equal(postprocess.debris_needs_glacier(m), ref_debris(m))
    assert np.array_equal(postprocess.debris_needs_glacier(m, to=3), ref_debris(m, to=3))


def test_component_filling_the_tile_and_one_without_ring():
    m = np.full((9, 7), 2, np.uint8)  # one component, no ring at all -> 0, as the reference
    assert np.array_equal(postprocess.remove_small(m, 2, 100), ref_remove_small(m, 2, 100))
    assert (postprocess.remove_small(m, 2, 100) == 0).all()


def test_ring_pixel_shared_by_two_components_counts_for_both():
    # two lake specks share ring pixels (8-adjacent to both through a diagonal gap)
    m = np.zeros((6, 6), np.uint8)
    m[:, 3:] = 1
    m[2, 2] = 3
    m[2, 4] = 3
    assert np.array_equal(postprocess.remove_small(m, 3, 5), ref_remove_small(m, 3, 5))


@pytest.mark.parametrize("preset", ["light", "competition"])
def test_presets_random_match_reference_chain(preset):
    import yaml
    import pathlib

    rules = yaml.safe_load((pathlib.Path(ROOT) / "glacier_submit" / "presets" / f"{preset}.yaml").read_text())["rules"]
    m = worst_case(11, (83, 91))
    ref = m.copy()
    for r in rules:
        if r["rule"] == "min_area":
            ref = ref_remove_small(ref, r["class"], r["min_area"])
        elif r["rule"] == "lake_shape":
            ref = ref_lake_shape(ref, r["class"], r["min_area"], r["min_width"])
        elif r["rule"] == "debris_needs_glacier":
            ref = ref_debris(ref, r["class"], r["glacier"], r["to"])
        elif r["rule"] == "fill_holes":
            ref = ref_fill_holes(ref, r["class"], r.get("max_area"))
    assert np.array_equal(postprocess.apply(m, rules), ref)


@pytest.mark.parametrize("seed", range(3))
def test_lake_shape_blobs_every_width(seed):
    # widths up to 14 take the disc erosion, wider ones the distance transform: both exact
    m = blobs(seed, (120, 111), sigma=4.0, cuts=(0.3, 0.5, 0.6))
    for min_width in (2.0, 3.0, 5.0, 6.5, 9.0, 13.9, 14.0, 15.0, 16.0, 21.0):
        got = postprocess.lake_shape(m, 3, 0, min_width)
        assert np.array_equal(got, ref_lake_shape(m, 3, 0, min_width)), min_width
    assert not np.array_equal(postprocess.lake_shape(m, 3, 0, 9.0), m)  # the rule did something


@pytest.mark.parametrize("seed", range(3))
def test_remove_small_blobs(seed):
    m = blobs(seed, (97, 130), sigma=1.5)
    for cls, area in ((1, 30), (2, 30), (3, 12), (0, 8)):
        assert np.array_equal(postprocess.remove_small(m, cls, area), ref_remove_small(m, cls, area)), (cls, area)


def naive_ring_counts(mask, chosen, n, k):
    """Per pixel outside the chosen components, the set of distinct chosen neighbour labels."""
    h, w = mask.shape
    counts = np.zeros((n, k), np.int64)
    for y in range(h):
        for x in range(w):
            if chosen[y, x]:
                continue
            seen = {int(chosen[y + dy, x + dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                    if 0 <= y + dy < h and 0 <= x + dx < w} - {0}
            for lab in seen:
                counts[lab, mask[y, x]] += 1
    return counts


@pytest.mark.parametrize("read_below", [0, 10 ** 9])  # always read the neighbours / always the moment test
@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # float64: labels beyond float32's exact range
def test_ring_counts_every_path_against_a_naive_loop(monkeypatch, read_below, dtype):
    monkeypatch.setattr(postprocess, "_NEIGHBOUR_READ_BELOW", read_below)
    m = worst_case(5, (41, 37), p=(0.3, 0.3, 0.2, 0.2))
    # a pixel with four different lake specks around it, one with three, one with the same
    # speck on two sides (a U around it)
    m[1:4, 1:4] = [[3, 0, 3], [0, 0, 0], [3, 0, 3]]
    m[1:4, 6:9] = [[3, 0, 3], [0, 1, 0], [0, 3, 0]]
    m[10:13, 10:13] = [[3, 3, 3], [0, 2, 3], [0, 0, 3]]
    for cls, area in ((3, 12), (1, 5), (0, 3)):
        n, lab, stats, _ = cv2.connectedComponentsWithStats((m == cls).astype(np.uint8), connectivity=8)
        sel = stats[:, 4] < area
        sel[0] = False
        chosen = np.where(sel[lab], lab, 0)
        got = postprocess._ring_counts(m, chosen.astype(dtype), n, 4)
        assert np.array_equal(got, naive_ring_counts(m, chosen, n, 4)), cls


@pytest.mark.parametrize("read_below", [0, 10 ** 9])
def test_three_consecutive_labels_around_one_pixel(monkeypatch, read_below):
    # labels 1, 2, 3 (raster order) all touch pixel (2, 2): the moment sum is exactly 1 there
    monkeypatch.setattr(postprocess, "_NEIGHBOUR_READ_BELOW", read_below)
    m = np.array([[0, 0, 1, 1, 1],
                  [0, 3, 2, 3, 1],
                  [0, 0, 2, 1, 1],
                  [0, 1, 3, 1, 1],
                  [0, 0, 1, 1, 1]], np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats((m == 3).astype(np.uint8), connectivity=8)
    assert n == 4 and {lab[1, 1], lab[1, 3], lab[3, 2]} == {1, 2, 3}
    chosen = lab.copy()
    chosen[stats[lab, 4] < 1] = 0
    got = postprocess._ring_counts(m, chosen.astype(np.float32), n, 4)
    assert np.array_equal(got, naive_ring_counts(m, chosen, n, 4))


def test_class_values_beyond_n_classes_and_other_layouts():
    # a stray 255 (k = 256), transposed / reversed views, signed and wide dtypes: all as the reference
    m = worst_case(9, (37, 41))
    m[::7, ::5] = 255
    for view in (m, m.T, m[::-1, ::-1]):
        want = ref_remove_small(view, 2, 6)
        for dtype in (np.uint8, np.int16, np.int32, np.int64, np.int8):
            v = view.astype(dtype) if dtype != np.int8 else np.where(view == 255, 127, view).astype(np.int8)
            ref = want if dtype != np.int8 else ref_remove_small(np.where(view == 255, 127, view).astype(np.uint8), 2, 6)
            assert np.array_equal(postprocess.remove_small(v, 2, 6).astype(np.int64), ref.astype(np.int64)), dtype


def test_empty_and_bad_widths():
    assert postprocess.apply(np.zeros((0, 5), np.uint8), [{"rule": "min_area", "class": 1, "min_area": 3}]).shape == (0, 5)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="min_width"):
            postprocess.validate_rules([{"rule": "lake_shape", "class": 3, "min_width": bad}])
        with pytest.raises(ValueError, match="min_width"):
            postprocess.lake_shape(np.zeros((4, 4), np.uint8), 3, 0, bad)


def _ref_remove_small(mask, cls, min_area):
    out = mask.copy()
    lab, n = ndi.label(mask == cls, structure=np.ones((3, 3)))
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() < min_area:
            ring = ndi.binary_dilation(comp, structure=np.ones((3, 3))) & ~comp
            vals = mask[ring]
            vals = vals[vals != cls]
            out[comp] = np.bincount(vals, minlength=4).argmax() if vals.size else 0
    return out


def _random_mask(seed, shape=(60, 70)):
    rng = np.random.default_rng(seed)
    import cv2

    base = rng.random((shape[0] // 6 + 1, shape[1] // 6 + 1))
    big = cv2.resize(base, shape[::-1], interpolation=cv2.INTER_NEAREST)
    mask = np.digitize(big, [0.5, 0.75, 0.9]).astype(np.uint8)
    speck = rng.random(shape)
    mask[speck < 0.03] = rng.integers(0, 4)
    return mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cls,min_area", [(3, 10), (2, 40), (1, 5)])
def test_remove_small_matches_scipy(seed, cls, min_area):
    m = _random_mask(seed)
    assert np.array_equal(postprocess.remove_small(m, cls, min_area), _ref_remove_small(m, cls, min_area))


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_matches_scipy(seed):
    m = _random_mask(seed)
    for cls in (1, 2):
        ref = m.copy()
        ref[ndi.binary_fill_holes(m == cls)] = cls
        assert np.array_equal(postprocess.fill_holes(m, cls), ref)


def test_fill_holes_max_area():
    m = np.ones((20, 20), np.uint8)
    m[2:4, 2:4] = 0     # 4 px hole
    m[8:14, 8:14] = 0   # 36 px hole
    out = postprocess.fill_holes(m, 1, max_area=10)
    assert (out[2:4, 2:4] == 1).all() and (out[8:14, 8:14] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_debris_rule_matches_scipy(seed):
    m = _random_mask(seed)
    lab, n = ndi.label(m == 2, structure=np.ones((3, 3)))
    near = ndi.binary_dilation(m == 1, structure=np.ones((3, 3)))
    ref = m.copy()
    for i in range(1, n + 1):
        if not (near & (lab == i)).any():
            ref[lab == i] = 0
    assert np.array_equal(postprocess.debris_needs_glacier(m), ref)


def test_lake_shape_thin_and_small():
    m = np.zeros((40, 40), np.uint8)
    m[5:25, 5:25] = 3      # a proper lake
    m[30, 2:38] = 3        # a one-pixel-wide line (shadow edge)
    m[35:37, 35:37] = 3    # a 4 px speck
    out = postprocess.lake_shape(m, 3, min_area=8, min_width=3)
    assert (out[5:25, 5:25] == 3).all() and (out[30] != 3).all() and (out[35:37, 35:37] != 3).all()
    ref = m.copy()
    dist = ndi.distance_transform_edt(np.pad(m == 3, 1))[1:-1, 1:-1]
    lab, n = ndi.label(m == 3, structure=np.ones((3, 3)))
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() < 8 or 2 * dist[comp].max() < 3:
            ref[comp] = 0
    assert np.array_equal(out, ref)


def test_rules_validation_and_disable():
    with pytest.raises(ValueError, match="rule"):
        postprocess.validate_rules([{"rule": "erode"}])
    m = _random_mask(1)
    assert np.array_equal(postprocess.apply(m, [{"rule": "min_area", "class": 3, "min_area": 50, "enabled": False}]), m)
