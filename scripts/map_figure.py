"""The README's mapping figure: a mapped scene's quick-look beside its outlines.

    python scripts/map_figure.py maps/LC08_L1TP_140041_20211015_20211015_02_T1 docs/img/map_scene.png

Reads what `glacier-submit map` wrote into the scene folder (quicklook.png, outlines.gpkg,
summary.json); needs the `report` and `map` extras (matplotlib, pyogrio, shapely).
"""
from __future__ import annotations

import json
import os
import sys


def main(folder: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pyogrio.raw
    import shapely
    from PIL import Image

    from glacier_submit.mapping.classify import PALETTE

    summary = json.load(open(os.path.join(folder, "summary.json")))
    quick = np.asarray(Image.open(os.path.join(folder, "quicklook.png")).convert("RGB"))
    meta, _, geoms, fields = pyogrio.raw.read(os.path.join(folder, "outlines.gpkg"), layer="outlines")
    cols = dict(zip(meta["fields"], fields))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [2.1, 1]})
    a.imshow(quick)
    a.set_title(f"{summary['scene']}: scene | classes (quicklook.png)", fontsize=9)
    a.axis("off")
    for poly, cid in zip(shapely.from_wkb(geoms), cols["class_id"]):
        colour = np.asarray(PALETTE[int(cid)]) / 255
        for part in getattr(poly, "geoms", [poly]):
            x, y = part.exterior.xy
            b.fill(np.asarray(x) / 1e3, np.asarray(y) / 1e3, color=colour, alpha=0.55, lw=0)
            b.plot(np.asarray(x) / 1e3, np.asarray(y) / 1e3, color=colour * 0.6, lw=0.4)
    areas = ", ".join(f"{k} {v['area_km2']:.0f} km2" for k, v in summary["classes"].items() if k != "background")
    b.set_title(f"outlines.gpkg ({len(geoms)} polygons, simplified {summary['outlines']['simplify_m']:.0f} m)\n{areas}",
                fontsize=9)
    b.set_aspect("equal")
    b.set_xlabel("easting, km (EPSG:32645)", fontsize=8)
    b.set_ylabel("northing, km", fontsize=8)
    b.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
