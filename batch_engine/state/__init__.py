"""What survives the process: the run ledger, the run lease and the usage log, behind one interface
(`backend.RunLedger`, `backend.UsageStore`) with two implementations chosen by the state URL (`url`): SQLite files
in the state directory (`ledger`, `usage_log`, opened by `store.SqliteStore`; the default) or one PostgreSQL
database shared by every worker (`pg_ledger`, `pg_usage_log`, over `postgres`)."""
