"""The pure math: tensors in, tensors out. Imports nothing of irank outside core."""
