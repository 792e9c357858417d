"""The CPU side of the engine: requests, KV block accounting, scheduling, the step loop, detokenizing."""
