//! replication (filled by its own module files).
