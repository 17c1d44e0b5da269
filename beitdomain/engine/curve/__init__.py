"""`beitdomain curve`: cells of ordinary fine-tunes over label fractions x seeds x inits.

grid.py names the cells, run.py schedules and runs them, baselines.py adds the arms without a
ViT (probes, pixel regression; classification only), report.py turns their rows into curve.csv,
report.md and the plot. With `finetune.task: segment` the cells are segmentation fine-tunes and
the curve is in foreground-mean Dice.
"""
