//! lockd client (in progress).
