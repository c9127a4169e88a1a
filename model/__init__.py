"""The ML: configuration, the synthetic scene world and its oracle; tokenizers and Parti."""
