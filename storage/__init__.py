"""Delta store: codec, content-addressed blobs, manifests, registry, ingest, base catalog."""
