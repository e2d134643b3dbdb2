"""moss-lightning: fine-tune MOSS-TTSD with PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
