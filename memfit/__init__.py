"""memfit command-line front (the `memfit` console script)."""
