"""Pipeline wiring, its compiled YAML, and the `parti` command."""
