"""The model as served: a bundle loaded into the vectors and scores the ranker answers from
(model.py) and a user's serving vector from their feedback (users.py). Offline jobs (the retraining
gate, rollout, evaluation) use the same code, so what they measure is what serves."""
