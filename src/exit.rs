//! Exit codes, in one place (design §5).

/// Consul unreachable, ACL denied, bad response, internal error.
pub const INTERNAL: u8 = 125;
/// The command was found but cannot be executed.
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;
/// Bad command line.
pub const USAGE: u8 = 2;
