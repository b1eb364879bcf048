"""The long-tailed classifier: ResNet-32, the LT losses and recipes, its step and metrics."""
