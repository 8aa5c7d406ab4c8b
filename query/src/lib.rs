//! lumen-query
