"""Model serving: replicas speaking the V2/V1 protocols, with dynamic batching and async jobs.

`protocol` (V2 wire format), `batching`, `server` (one replica, `python -m distml.serve.server`)
and `jobs` (durable async inference); the gateway modules put replicas behind one address.
"""
