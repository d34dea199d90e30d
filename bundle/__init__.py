"""Custom components of the DicycleGAN MONAI bundle, referenced by ``_target_`` from ``configs/*.json``.

Configs import the package once (``"$import bundle"``) and reach the modules as ``bundle.<module>``; the phantom,
which needs nilearn, is imported on its own by the scripts that build demo data.
"""

from . import data, datalist, handlers, inference, losses, metrics, networks, settings, trainer, transforms

__all__ = [
    "data",
    "datalist",
    "handlers",
    "inference",
    "losses",
    "metrics",
    "networks",
    "settings",
    "trainer",
    "transforms",
]
