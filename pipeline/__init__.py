"""Domain QLoRA adapters on Ray: raw public datasets in, one adapter per domain plus a report out."""
__version__ = "0.1.0"
