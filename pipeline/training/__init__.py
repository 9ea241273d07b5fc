"""The IDM training loop (plain PyTorch, no Ray), its config, the data split and the search space."""
