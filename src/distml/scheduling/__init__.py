"""Scheduling: gang, fair-share and priority admission of every job onto the workspace's pool.

`core` (the pure decision: `Scheduler.schedule(now)`, no clock, no I/O), `store` (its shared state
in the metadata store), `admission` (the pools jobs acquire leases from, driving the core from the
store across processes) and `metrics` (what passes decide, and the pool at each scrape).
"""
