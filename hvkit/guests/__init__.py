"""Prebuilt freestanding guest ELFs (built by setup.py from guests/)."""
