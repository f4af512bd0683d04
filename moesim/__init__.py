"""moesim: plan and simulate Mixture-of-Experts inference on GPU clusters and edge devices."""

__version__ = "0.1.0"
