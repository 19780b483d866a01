//! The messages labbook publishes between its own stages, and their ids. They carry ids,
//! never a secret.

use serde::{Deserialize, Serialize};

use crate::broker::{Outgoing, StageQueue, Subject};

/// Body of `credentials-ready`, `provision-due` and `teardown-due`
/// (docs/contract.md §2: `{"booking_id": "<id>"}`). labbook adds `revision` to the messages its
/// timer publishes: the revision of the booking that armed the timer, so a message for a time
/// that has since moved is recognised. A message without it is taken as current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingRef {
    pub booking_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
}

impl BookingRef {
    /// The message asking `queue`'s stage to work on `booking_id`.
    pub fn outgoing(queue: StageQueue, booking_id: &str) -> Outgoing {
        Self::at_revision(queue, booking_id, None)
    }

    /// The same, for the booking's `revision`.
    pub fn at_revision(queue: StageQueue, booking_id: &str, revision: Option<u32>) -> Outgoing {
        let body = BookingRef {
            booking_id: booking_id.to_owned(),
            revision,
        };
        let detail = revision.map(|r| format!("r{r}"));
        Outgoing::json(
            queue,
            message_id(queue, booking_id, detail.as_deref()),
            &body,
        )
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
    /// `Booking Updated`, once per accepted revision (docs/contract.md §5).
    Updated,
    /// `Booking Cancelled`.
    Cancelled,
}

impl EmailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EmailKind::Confirmation => "confirmation",
            EmailKind::InstanceDetails => "instance_details",
            EmailKind::Failure => "failure",
            EmailKind::Updated => "updated",
            EmailKind::Cancelled => "cancelled",
        }
    }
}

/// Body of `notify`: the booking's email of `kind` for `revision` (each kind is sent once per
/// booking and revision; 0 when absent, as in messages published before revisions existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyMessage {
    pub booking_id: String,
    pub kind: EmailKind,
    #[serde(default)]
    pub revision: u32,
    /// 0: the email the pipeline sends; n: an operator's n-th resend of it (the console books
    /// the copy in the email log first, see `store::emails::book_copy`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copy: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl NotifyMessage {
    /// The message asking the notifier for the booking's email of `kind`.
    pub fn outgoing(booking_id: &str, kind: EmailKind) -> Outgoing {
        Self::at_revision(booking_id, kind, 0)
    }

    /// The message asking for the email of `kind` of the booking's `revision`.
    pub fn at_revision(booking_id: &str, kind: EmailKind, revision: u32) -> Outgoing {
        let body = NotifyMessage {
            booking_id: booking_id.to_owned(),
            kind,
            revision,
            copy: 0,
        };
        let detail = match revision {
            0 => kind.as_str().to_owned(),
            r => format!("{}/r{r}", kind.as_str()),
        };
        let id = message_id(StageQueue::Notify, booking_id, Some(&detail));
        Outgoing::json(StageQueue::Notify, id, &body)
    }

    /// The message asking for copy `copy` (1, 2, …) of the email of `kind` of `revision`: an
    /// operator's resend, with an id of its own so it is not taken for the original.
    pub fn resend(booking_id: &str, kind: EmailKind, revision: u32, copy: u32) -> Outgoing {
        let body = NotifyMessage {
            booking_id: booking_id.to_owned(),
            kind,
            revision,
            copy,
        };
        let detail = format!("{}/r{revision}/copy{copy}", kind.as_str());
        let id = message_id(StageQueue::Notify, booking_id, Some(&detail));
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
        assert_eq!(notify.queue(), Some(StageQueue::Notify));
        let moved = BookingRef::at_revision(StageQueue::ProvisionDue, "b-1", Some(3));
        assert_eq!(moved.message_id, "provision-due/b-1/r3");
        assert_eq!(moved.body, br#"{"booking_id":"b-1","revision":3}"#);
        let updated = NotifyMessage::at_revision("b-1", EmailKind::Updated, 2);
        assert_eq!(updated.message_id, "notify/b-1/updated/r2");
        assert!(!String::from_utf8_lossy(&updated.body).contains("copy"));
        let resent = NotifyMessage::resend("b-1", EmailKind::InstanceDetails, 2, 1);
        assert_eq!(resent.message_id, "notify/b-1/instance_details/r2/copy1");
        let body: NotifyMessage = serde_json::from_slice(&resent.body).unwrap();
        assert_eq!((body.revision, body.copy), (2, 1));
    }
}
