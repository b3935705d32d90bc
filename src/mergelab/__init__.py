"""mergelab: train neural networks and average or merge their weights."""

from mergelab.errors import UserError

__all__ = ["UserError"]
