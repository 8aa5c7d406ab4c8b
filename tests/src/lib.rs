//! lumen-tests
