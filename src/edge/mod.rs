//! NNG edges.
