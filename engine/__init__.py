"""Training and evaluation machinery shared by the command lines (train.py, evaluate.py, scripts/).

Each concern is one module named after it: the metric, inference, checkpoints, distributed set-up and
precision, the loss, offset capture, the trainer. Modules here import ``configs``, ``data`` and
``models``, never a command line.
"""
