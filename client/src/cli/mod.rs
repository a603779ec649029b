//! lockctl (in progress).
