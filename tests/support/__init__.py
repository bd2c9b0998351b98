"""Helpers shared by the tests, imported by package name: `from support.common import SMALL`."""
