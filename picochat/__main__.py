"""`python -m picochat ...`: the same command line as `picochat ...`."""

from picochat.cli import entry

entry()
