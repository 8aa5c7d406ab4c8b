//! lumen-collector
