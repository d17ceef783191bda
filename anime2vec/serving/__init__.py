"""Infrastructure every anime2vec gRPC service shares: settings, logging, metrics, rich errors,
page tokens and a server builder with health, reflection, observability and clean shutdown."""
