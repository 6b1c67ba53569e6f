"""Test kit: tiny random VLMs per family, slow float64 references, the adapter conformance suite."""
