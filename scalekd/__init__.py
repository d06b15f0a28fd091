"""ScaleKD: scale-aware knowledge distillation for small-object detectors."""

__version__ = "0.1.0"
