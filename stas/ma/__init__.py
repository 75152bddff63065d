"""Massive-activation analysis: capture hooks that reduce block outputs on the device (capture.py), statistics and
calibration (stats.py), region statistics, the hierarchy verdict and the period test (hierarchy.py), plots
(plots.py), a run's analysis (analysis.py) and the comparison of runs (compare.py)."""
