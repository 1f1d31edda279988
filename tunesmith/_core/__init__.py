"""Lowest layer: errors, seeding, run-directory files. Imports nothing heavy."""
