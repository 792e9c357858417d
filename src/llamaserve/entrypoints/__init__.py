"""User entry points: the offline `LLM` API and the `llamaserve` command line."""
