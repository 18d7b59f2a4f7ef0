"""aigd: detect AI-generated images with Qwen2.5-VL + LoRA, trained on Ray Train, served on Ray Serve."""

__version__ = "0.1.0"
