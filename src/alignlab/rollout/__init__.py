"""Sampling from the policy and scoring what it samples (reward models, reward functions)."""
