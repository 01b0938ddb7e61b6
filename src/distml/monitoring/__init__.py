"""Monitoring: Prometheus metrics of every long-running distml process and where each serves them."""
