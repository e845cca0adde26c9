"""Drift and shadow traffic, from publish to report: references fixed at publish, counting in the worker,
shadow runs, their store beside the results, and the drift and shadow reports."""
