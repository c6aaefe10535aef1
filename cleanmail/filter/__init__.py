"""The SMTP content filter daemon and its verdict checks."""
