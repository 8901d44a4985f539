"""sd-webui-trt core: export Stable Diffusion UNets to ONNX, build TensorRT / TensorRT-RTX / ONNX Runtime engines,
keep them in an on-disk registry and run them in place of the PyTorch UNet.

Importing this package does no work: no GPU probing, no TensorRT import, no logging configuration.
"""

__version__ = "0.1.0"
