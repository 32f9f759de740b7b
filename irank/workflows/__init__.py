"""Workflows that compose stages: post-train's loop and the demo."""
