"""Trained behaviour agents (stable-baselines3 SAC) for the D4RL-like sim-<env>-{medium,expert,...} sets:
training with checkpoints and a full record of its rollouts, and publishing the actors as safetensors."""
