"""The one-machine demo: real planner, stage and coordinator processes on loopback."""
