"""Training stages after pretraining, each a loss plus a driver around the shared loop."""
