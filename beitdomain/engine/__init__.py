"""What runs a job, laid out as the data flow.

run/     the run folder, its guard and lock, checkpoints, metrics log, trackers
train/   loop, plan, optim, schedule, signals, distributed, estimate: the shared runtime
job.py   one run for every job, on run/ and train/; build.py builds models and loads inits
tokenizer.py, pretrain.py, finetune.py, predict.py, represent.py, represent_eval.py: the jobs
curve/   cells of ordinary fine-tunes (grid, run, baselines, report)
ablation.py, demo.py: orchestrators over the jobs and the curve
"""
