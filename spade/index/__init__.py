"""The gallery of normal images: its files, the image-level kNN index, and coreset memory banks."""
