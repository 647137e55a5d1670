//! The source side of replication: bulk transfer and cycles.
