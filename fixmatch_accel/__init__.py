"""FixMatch semi-supervised image classification on HuggingFace Accelerate."""
