//! Exit codes of `rtrain` and of the processes it starts.

/// A launch that failed (a role out of restarts, a worker that could not start...), or a worker
/// whose training loop failed.
pub const FAILED: u8 = 1;
/// A config or usage error (`rtrain`), or a process started without a valid worker environment.
pub const USAGE: u8 = 2;
