"""Small shared helpers: atomic I/O, progress, logging."""
