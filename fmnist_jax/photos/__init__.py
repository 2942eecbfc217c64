"""Your photos as Fashion-MNIST inputs, and test images turned into photos to measure that."""
