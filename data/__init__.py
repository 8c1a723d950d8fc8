"""Data code: the ADE20K-layout dataset, its transforms and loaders, and the generated demo dataset."""

IGNORE_INDEX = 255  # the one ignore label: unlabelled ("other") pixels, padding, loss and metric
