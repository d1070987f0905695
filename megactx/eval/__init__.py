"""Long-context evaluation: passkey retrieval, RULER's synthetic tasks, and the backends they run on."""
