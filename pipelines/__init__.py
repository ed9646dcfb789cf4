"""Pipeline assembly and the `spade` command line."""
