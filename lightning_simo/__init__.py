"""lightning_simo: dense multi-task learning by model merging, on one Lightning CLI."""

__version__ = "0.1.0"

__all__ = ["__version__"]
