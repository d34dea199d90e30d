"""Custom components of the DicycleGAN MONAI bundle, referenced by ``_target_`` from ``configs/*.json``."""
