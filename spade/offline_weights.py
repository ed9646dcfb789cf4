"""Loaders for ImageNet weights shipped inside installed Python packages (no hub, no network)."""
