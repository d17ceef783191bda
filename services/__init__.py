"""The anime2vec gRPC services, one process each (`python -m services.<name>.server`)."""
