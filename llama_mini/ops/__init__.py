"""What is applied to a built model from outside it: the training loss (loss.py), fused kernels
(kernels.py) and the fast paths that choose and apply them (fast_paths.py). Importing this package imports
none of them, so `import llama_mini` never reaches for Triton."""
