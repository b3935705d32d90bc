"""Merge mathematics as pure functions of state dicts and tensors; files, logging and devices stay in the tasks."""
