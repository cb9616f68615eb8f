//! Checkpointed projectors from the log to the read models, `read_states`, usage/billing and
//! Prometheus metrics. Not built yet: issue 4. The log reader it will use is
//! `amplog_commands::reader`.
