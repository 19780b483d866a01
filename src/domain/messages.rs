//! The messages labbook publishes between its own stages, and their ids. They carry ids,
//! never a secret.

use serde::{Deserialize, Serialize};

use crate::broker::{Outgoing, StageQueue, Subject};

/// Body of `credentials-ready`, `provision-due` and `teardown-due`
/// (docs/contract.md §2: `{"booking_id": "<id>"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingRef {
    pub booking_id: String,
}

impl BookingRef {
    /// The message asking `queue`'s stage to work on `booking_id`.
    pub fn outgoing(queue: StageQueue, booking_id: &str) -> Outgoing {
        let body = BookingRef {
            booking_id: booking_id.to_owned(),
        };
        Outgoing::json(queue, message_id(queue, booking_id, None), &body)
    }
}

impl Subject for BookingRef {
    fn subject(&self) -> &str {
        &self.booking_id
    }
}

/// The emails a booking can cause, stored in the email log as their snake_case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
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

impl NotifyMessage {
    /// The message asking the notifier for the booking's email of `kind`.
    pub fn outgoing(booking_id: &str, kind: EmailKind) -> Outgoing {
        let body = NotifyMessage {
            booking_id: booking_id.to_owned(),
            kind,
        };
        let id = message_id(StageQueue::Notify, booking_id, Some(kind.as_str()));
        Outgoing::json(StageQueue::Notify, id, &body)
    }
}

impl Subject for NotifyMessage {
    fn subject(&self) -> &str {
        &self.booking_id
    }
}

/// The AMQP message id of everything labbook publishes between its stages:
/// `<queue>/<booking id>[/<detail>]`, the same for every copy of the same request.
fn message_id(queue: StageQueue, booking_id: &str, detail: Option<&str>) -> String {
    match detail {
        Some(detail) => format!("{queue}/{booking_id}/{detail}"),
        None => format!("{queue}/{booking_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_name_the_queue_the_booking_and_the_email() {
        let ready = BookingRef::outgoing(StageQueue::CredentialsReady, "b-1");
        assert_eq!(ready.message_id, "credentials-ready/b-1");
        assert_eq!(ready.body, br#"{"booking_id":"b-1"}"#);
        let due = BookingRef::outgoing(StageQueue::TeardownDue, "b-1");
        assert_eq!(due.message_id, "teardown-due/b-1");
        let notify = NotifyMessage::outgoing("b-1", EmailKind::InstanceDetails);
        assert_eq!(notify.message_id, "notify/b-1/instance_details");
        assert_eq!(notify.queue, StageQueue::Notify);
    }
}
