"""Test helpers shipped with hubbot: tiny, real, deterministic Phi fixtures (see `tiny_models`)."""
