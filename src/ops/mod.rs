//! What the operator's two tools share: the `labbook` command ([`crate::cli`]) and the web
//! console ([`crate::console`]) handle dead letters, and publish changes to bookings, with the
//! same rules and the same code.

pub mod change;
pub mod dlq;
