"""``glacier-submit map``: a bundle (or members) applied to whole scenes.

scene.py    find a scene's band files (Landsat Collection 2 or named by role)
raster.py   read them together, window by window (rasterio)
classify.py block-by-block prediction with the runtime, written as it goes
outputs.py  Cloud-Optimised GeoTIFF, outlines (GeoPackage), quick-look PNG
job.py      one scene, written atomically into OUT/<scene>/, skipped when done
many.py     many scenes on Dask distributed
"""
