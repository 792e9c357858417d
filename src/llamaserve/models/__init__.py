"""Model architectures, written only with llamaserve.layers."""
