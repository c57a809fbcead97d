"""taskarith: edit pre-trained networks by task arithmetic."""

__version__ = "0.1.0"
