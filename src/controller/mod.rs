//! controller (filled by its own module files).
