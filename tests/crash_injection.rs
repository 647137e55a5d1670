//! Crash injection: placeholder until the suite lands.
