"""Experiments across methods: compare, evaluate and their report."""
