"""Training and evaluation machinery shared by the command lines (train.py, evaluate.py, scripts/).

Each concern is one module named after it: the loss and the optimizer step (the recipe, with models/ and data/),
evaluation, inference and the metric, checkpoints, the work dir and its lock, stop signals, the device and what fits
it, distributed set-up, TensorBoard, offsets, statistics and the comparison. The training loop itself is train.py's.
Modules here import ``configs``, ``data`` and ``models``, never a command line.
"""
