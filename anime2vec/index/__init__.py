"""The item index the ranker serves from and the offline jobs (rollout, retraining) build: base.py is
the interface, edge.py the embedded Qdrant engine (default), client.py a Qdrant server, backends.py
picks one."""
