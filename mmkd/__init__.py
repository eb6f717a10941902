"""mmkd: distill large vision-language teachers into small multimodal students."""

__version__ = "0.1.0"
