"""Model building blocks. Each op has a torch reference (CPU and GPU); GPU kernels plug in by backend name."""
