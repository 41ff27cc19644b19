"""kdsearch.models."""
