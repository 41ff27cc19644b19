"""kdsearch.report."""
