"""The decisions, in plain Python: registry and state machine, workflows, jobs, placement."""
