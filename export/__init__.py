"""vpr-edge export side: PyTorch models, official checkpoints, ONNX and engines."""
