//! hw tests
