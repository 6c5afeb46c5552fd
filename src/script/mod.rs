//! The Rhai host: engine, API registration, error mapping, stdlib modules.
