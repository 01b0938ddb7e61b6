"""The floor every other package stands on; it imports nothing else of distml.

The database (engine, a UTC datetime column type), model references (`ModelRef`) and process
liveness: the values and helpers that cross every process boundary and every layer.
"""

# The environment variables a process may read at its edge (the CLI, a cluster pod's entry point),
# never deeper: from there the values travel in each process's config file.
HOME_ENV = "DISTML_HOME"
DB_URL_ENV = "DISTML_DB_URL"
