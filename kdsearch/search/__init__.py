"""kdsearch.search."""
