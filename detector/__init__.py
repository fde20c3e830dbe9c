"""detector: Detectron-style object detection training in PyTorch."""
__version__ = "0.1.0"
