//! envtest (filled by its own module files).
