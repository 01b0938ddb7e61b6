"""The floor every other package stands on; it imports nothing else of distml.

The database (engine, a UTC datetime column type), model references (`ModelRef`) and process
liveness: the values and helpers that cross every process boundary and every layer.
"""
