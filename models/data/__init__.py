"""What the training data is: the long-tailed subset, epoch resampling plans, image space."""
