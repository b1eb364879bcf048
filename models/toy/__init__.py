"""The toy long-tail bench: a 2-D class-conditional mixture on which every method trains in seconds."""
