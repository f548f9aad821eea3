"""pllcli: train audio classifiers from ambiguous labels."""

__version__ = "0.1.0"
