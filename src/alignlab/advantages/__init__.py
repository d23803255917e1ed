"""Advantage estimators for policy-gradient training: GAE for PPO, group-relative advantages for GRPO."""
