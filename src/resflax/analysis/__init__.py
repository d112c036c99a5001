"""Counts, layer responses, reports and plots."""
