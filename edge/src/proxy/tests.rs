//! Unit tests of the proxy core.
