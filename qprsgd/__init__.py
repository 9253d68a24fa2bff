"""qprsgd: an MPI experiment runner for communication-efficient distributed SGD."""
__version__ = "0.1.0"
