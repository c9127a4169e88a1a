"""Export and serving: ONNX/TensorRT export, the Triton model repository, images and manifests."""
