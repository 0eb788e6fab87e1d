//! Internal DNS (see issue 5).
