"""Input and output: storage through fsspec, image sources and decoding, table schemas, map PNGs, run results."""
