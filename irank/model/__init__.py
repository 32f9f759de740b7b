"""The model layer: checkpoints, architectures, inputs, the forward pass, layer features, training loops, devices."""
