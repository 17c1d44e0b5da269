"""`beitdomain curve`: cells of ordinary fine-tunes over label fractions x seeds x inits.

grid.py names the cells, run.py schedules and runs them, baselines.py adds the arms without a
ViT (probes, pixel regression), report.py turns their rows into curve.csv, report.md and the plot.
"""
