"""Model serving: replicas speaking the V2/V1 protocols behind a gateway, configured by one `ServeConfig`.

`config` (settings), `model` (the transport-free core), `protocol` (wire formats), `http` (shared HTTP
plumbing), `server` (one replica), `gateway` + `replicas` + `sharding` + `autoscaler` (one address in
front of many), `batching` and `jobs` (durable async inference).
"""
