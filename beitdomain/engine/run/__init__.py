"""A run's folder and what it holds: the folder and its guard and lock (folder.py, guard.py),
checkpoints (checkpoint.py), the metrics log (metrics_log.py) and the trackers it feeds
(trackers.py). Every job writes through these; nothing here trains."""
