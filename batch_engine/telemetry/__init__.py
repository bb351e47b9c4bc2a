"""What happened to the bill: the usage log of billed requests, cache statistics, and the optimization report."""
