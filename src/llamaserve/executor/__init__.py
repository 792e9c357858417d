"""The device side: the model runner turns scheduler output into tensors, runs the model and samples."""
