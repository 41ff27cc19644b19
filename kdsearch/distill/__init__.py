"""kdsearch.distill."""
