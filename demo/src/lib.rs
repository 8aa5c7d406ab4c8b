//! lumen-demo
