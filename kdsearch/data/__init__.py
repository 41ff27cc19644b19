"""kdsearch.data."""
