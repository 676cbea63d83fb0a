"""Loaders that publish a finished run to the systems a live shop reads from.

One module per target (:mod:`.elastic`, :mod:`.postgres`, :mod:`.sqlite`), all fed by
:mod:`.run_data`, which reads a run directory and refuses one that is incomplete or
inconsistent. The command line is :mod:`pipeline.export`.
"""
