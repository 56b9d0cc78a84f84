"""gpuwatch.core: what every layer shares: the vocabulary, the one reader of /proc, the view's types and the
control protocol. It imports nothing else of gpuwatch."""
