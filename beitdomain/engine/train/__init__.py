"""The runtime shared by every training job: the loop (fit, checkpoint, resume, logging), the
plan of steps and loaders, the optimizer and its schedule, signals, devices and process groups
(distributed.py), and the CPU time estimate said before training starts."""
