"""Command-line tools of the repository (python-fire); :mod:`scripts.tooling` holds the experiment tooling."""
