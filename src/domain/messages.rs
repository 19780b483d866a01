//! The messages labbook publishes between its own stages. They carry ids, never a secret.

use serde::{Deserialize, Serialize};

/// Body of `credentials-ready`, `provision-due` and `teardown-due`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingRef {
    pub booking_id: String,
}

/// The three emails a booking can cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailKind {
    Confirmation,
    InstanceDetails,
    Failure,
}

impl EmailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EmailKind::Confirmation => "confirmation",
            EmailKind::InstanceDetails => "instance_details",
            EmailKind::Failure => "failure",
        }
    }
}

/// Body of `notify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyMessage {
    pub booking_id: String,
    pub kind: EmailKind,
}
