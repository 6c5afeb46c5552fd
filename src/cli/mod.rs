//! Command line and REPL.
