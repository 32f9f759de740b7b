"""The runtime: errors, processes (torchrun), memory budgets and spilling, progress."""
