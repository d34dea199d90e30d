"""Custom components of the DicycleGAN MONAI bundle, referenced by ``_target_`` from ``configs/*.json``.

Configs import the package once (``"$import bundle"``) and reach the modules as ``bundle.<module>``. The phantom and
the dataset builders are experiment tooling in ``scripts/tooling``, which the model zoo export does not ship.
"""

from . import data, datalist, handlers, inference, losses, metrics, networks, settings, trainer, transforms

__all__ = ["data", "datalist", "handlers", "inference", "losses", "metrics", "networks", "settings", "trainer"]
__all__ += ["transforms"]
