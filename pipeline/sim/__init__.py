"""Simulated D4RL-layout datasets from MuJoCo (Gymnasium), and replaying states to judge an IDM by physics."""
