"""The ranker service: owns the model bundle and the Qdrant collection of item tower vectors."""
