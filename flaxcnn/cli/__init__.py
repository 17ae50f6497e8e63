"""Command-line layer: flags and arguments, workdir checks, one-line errors -> library calls."""
