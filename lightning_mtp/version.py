"""The library version: a leaf every layer may import (the package ``__init__`` imports everything else)."""

__version__ = "0.1.0"
