"""kvtrim's version, in one place (rows, manifests and ``--version`` read it)."""

__version__ = "0.1.0"
