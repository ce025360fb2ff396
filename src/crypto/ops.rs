//! CLI operations (filled in below).
