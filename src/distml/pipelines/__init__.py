"""Complete pipelines built from the data, training, serving and workflow layers."""
