"""Choosing a bundle's settings from out-of-fold evidence (``build --tune oof``, ``--bias auto``):
``decisions`` (one function per decision), ``stats`` (bootstrap gains), ``bias`` (the
regularised bias fit), ``evidence`` (the members' OOF arrays and the bundle's predictor)."""
