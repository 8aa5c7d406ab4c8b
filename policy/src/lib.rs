//! lumen-policy
