"""What survives the process: the run ledger, the run lease and the usage log, each a SQLite file in the state
directory (`store.SqliteStore` opens them all the same way)."""
