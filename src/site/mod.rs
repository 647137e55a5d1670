//! site (filled by its own module files).
