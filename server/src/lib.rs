//! lockd server (in progress).
