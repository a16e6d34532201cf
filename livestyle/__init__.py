"""livestyle: real-time video restyling with few-step diffusion."""

__version__ = "0.1.0"
