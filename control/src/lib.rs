//! lumen-control
