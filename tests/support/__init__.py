"""What the tests share: the session fixtures (`fixtures`), engine runs against the emulator (`engine`), real
processes killed at crash points (`crash`, `crash_driver`), a real Prefect server (`prefect_server`), and the
pydantic models test configs name (`schema_models`). Tests import from here, never from each other."""
