//! Shared helpers for the fleet's black-box tests.
