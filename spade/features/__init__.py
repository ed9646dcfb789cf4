"""Features: the ImageNet backbone and its feature pyramid, and where its weights come from."""
