"""The benchmark's one app: a small table and the views the workloads request."""
