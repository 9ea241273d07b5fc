"""How good a model is: metric names and the one ranking rule, evaluation, the report, the recipe."""
