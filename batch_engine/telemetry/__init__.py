"""What happened to the bill: cache statistics, the optimization report (`batch-engine report`) and the config
patch it proposes. The usage log they read is `batch_engine.state.usage_log`."""
