"""Cleanmail: the quarantine manager of an internet provider's mail platform."""

__version__ = "0.1.0"
