"""The `muestra` command line: a thin layer over the library."""
