"""Training scripts kept for parity, and dataset generators (see the training issue)."""
