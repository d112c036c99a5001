"""Shared pytest setup: tests import helpers from this folder (rootdir-relative, no package)."""
