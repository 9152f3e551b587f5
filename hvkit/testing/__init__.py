"""pytest support for hardware-gated tests (registered as a pytest11 plugin)."""
