"""vpr-edge runtime: torch-free place recognition on a robot.

Only numpy, Pillow, onnxruntime, faiss and (guarded) TensorRT/CUDA Python are imported here;
``tests/test_runtime_no_torch.py`` proves it.
"""
