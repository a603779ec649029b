//! State machine unit tests.
