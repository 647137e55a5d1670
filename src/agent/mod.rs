//! agent (filled by its own module files).
