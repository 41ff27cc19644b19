"""kdsearch.measure."""
