//! The events an upstream follows a booking by (docs/contract.md §7): exchange
//! `labbook.events`, routing key `booking.<event>`, message id `<booking_id>.<event>.<revision>`.
//! Their bodies are recorded with the booking's history (`store::events`) and published from
//! there, so a copy published again is the same message.

use serde::Serialize;

use crate::broker::Outgoing;

/// A step of a booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The booking, or an update of it, was stored.
    Accepted,
    /// A booking message was dead-lettered (invalid, conflict, refused update).
    Rejected,
    /// The confirmation (or update) email was sent.
    Confirmed,
    /// Every machine runs with its address and the instance details email was sent.
    Provisioned,
    /// Provisioning failed for good; the failure email was sent.
    Failed,
    /// The booking was cancelled.
    Cancelled,
    /// The machines were terminated at the end of the booking.
    Ended,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Rejected => "rejected",
            EventKind::Confirmed => "confirmed",
            EventKind::Provisioned => "provisioned",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Ended => "ended",
        }
    }

    /// The kind [`EventKind::as_str`] names.
    pub fn parse(name: &str) -> Option<Self> {
        [
            EventKind::Accepted,
            EventKind::Rejected,
            EventKind::Confirmed,
            EventKind::Provisioned,
            EventKind::Failed,
            EventKind::Cancelled,
            EventKind::Ended,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// One machine in a `provisioned` event: where it answers and who logs in there. Never a
/// password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventInstance {
    pub url: String,
    pub usernames: Vec<String>,
}

/// An event about to be recorded and published.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub booking_id: String,
    pub event: EventKind,
    /// The revision of the message that caused it.
    pub revision: u32,
    /// RFC 3339, UTC.
    pub at: String,
    /// The booking's state after the step; `None` for a booking that was never stored.
    pub state: Option<String>,
    /// One human line, never a secret; may be empty.
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<EventInstance>>,
    /// `ended` and `cancelled`: the running time of the booking's machines, summed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_seconds: Option<u64>,
    /// With it, where `LABBOOK_PRICES` names every machine's type: their cost in USD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<f64>,
}

impl Event {
    pub fn new(booking_id: &str, event: EventKind, revision: u32) -> Self {
        Self {
            booking_id: booking_id.to_owned(),
            event,
            revision,
            at: crate::format_time(chrono::Utc::now()),
            state: None,
            detail: String::new(),
            instances: None,
            machine_seconds: None,
            estimated_cost: None,
        }
    }

    /// What the booking's machines ran for, and cost where the prices say.
    pub fn cost(mut self, usage: &super::cost::Usage, prices: &super::cost::Prices) -> Self {
        self.machine_seconds = Some(usage.machine_seconds());
        self.estimated_cost = prices.estimate(usage);
        self
    }

    pub fn state(mut self, state: impl std::fmt::Display) -> Self {
        self.state = Some(state.to_string());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = crate::broker::headers::one_line(&detail.into(), 500);
        self
    }

    pub fn instances(mut self, instances: Vec<EventInstance>) -> Self {
        self.instances = Some(instances);
        self
    }
}

/// The message of an event whose recorded body is `body`.
pub fn outgoing(booking_id: &str, event: EventKind, revision: u32, body: String) -> Outgoing {
    Outgoing::event(
        format!("booking.{}", event.as_str()),
        format!("{booking_id}.{}.{revision}", event.as_str()),
        body.into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Route;

    #[test]
    fn an_event_is_routed_and_named_as_the_contract_says() {
        let body = serde_json::to_string(
            &Event::new("course-1", EventKind::Accepted, 2)
                .state("received")
                .detail("stored\nwith 3 users"),
        )
        .unwrap();
        let out = outgoing("course-1", EventKind::Accepted, 2, body.clone());
        assert_eq!(out.route, Route::Event("booking.accepted".into()));
        assert_eq!(out.message_id, "course-1.accepted.2");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["event"], "accepted");
        assert_eq!(v["revision"], 2);
        assert_eq!(v["state"], "received");
        assert_eq!(v["detail"], "stored with 3 users");
        assert!(v.get("instances").is_none());
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(EventKind::parse("ended"), Some(EventKind::Ended));
        assert_eq!(EventKind::parse("nope"), None);
    }
}
