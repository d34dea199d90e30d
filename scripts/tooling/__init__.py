"""Experiment tooling that the model zoo export does not ship: the brain phantom and the dataset builders."""
