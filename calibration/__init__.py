"""INT8 calibration on real place images: calibration sets, Q/DQ graphs, the TensorRT 8.x
calibrator, and the precision report. Torch-free (ONNX Runtime does the calibration)."""
