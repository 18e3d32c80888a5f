"""Utilities that import nothing of lads outside themselves: checkpoint folders, model cards, the Hub,
downloads, torchrun, FLOPs, mixed precision, boxes and images."""
