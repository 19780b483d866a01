//! Dead letters as operators handle them: which queue a name means, which dead letters a
//! filter or a selection takes, what a replay would move, and the replay and purge
//! themselves. Reading, replaying and purging go through [`crate::broker::dlq`], so a listing
//! never loses or reorders a dead letter and a replayed one is confirmed in its stage queue
//! before it leaves the dead-letter queue.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use lapin::Connection;
use sha2::{Digest, Sha256};

use crate::broker::StageQueue;
use crate::broker::dlq::{self, DeadLetter, DlqError, ReplayReport};

/// The stage queue `queue` names (its own name or its `.dlq` name); the error lists the names.
pub fn stage_of(queue: &str) -> anyhow::Result<StageQueue> {
    StageQueue::parse(queue).ok_or_else(|| anyhow::anyhow!(unknown_queue(queue)))
}

/// "unknown queue …: use one of …", for a name that is no stage queue.
pub fn unknown_queue(queue: &str) -> String {
    let names: Vec<&str> = StageQueue::ALL.iter().map(|q| q.name()).collect();
    format!(
        "unknown queue {queue:?}: use one of {} (or its .dlq name)",
        names.join(", ")
    )
}

/// Which dead letters an operation takes: all of them by default; each filter narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Only this booking's.
    pub booking_id: Option<String>,
    /// Only those whose `x-labbook-error` contains this text (case-insensitive).
    pub error_contains: Option<String>,
    /// Only these dead letters, by [`fingerprint`] (what an operator ticked, or what a dry
    /// run showed).
    pub ids: Option<BTreeSet<String>>,
    /// At most this many (replay only).
    pub limit: Option<usize>,
}

impl Selection {
    /// Every dead letter of one booking (as `--booking-id` selects).
    pub fn booking(booking_id: Option<&str>) -> Self {
        Self {
            booking_id: booking_id.map(str::to_owned),
            ..Self::default()
        }
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let error_matches = |text: &String| {
            let needle = text.to_lowercase();
            letter
                .error
                .as_deref()
                .is_some_and(|e| e.to_lowercase().contains(&needle))
        };
        letter.matches(self.booking_id.as_deref())
            && self.error_contains.as_ref().is_none_or(error_matches)
            && self
                .ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&fingerprint(letter)))
    }

    /// Whether it takes every dead letter (no filter, no selection, no limit).
    pub fn is_everything(&self) -> bool {
        *self == Self::default()
    }
}

/// A short id for a dead letter that stays the same across listings: a hash of its body and
/// the headers labbook gave it. Two identical copies share it.
pub fn fingerprint(letter: &DeadLetter) -> String {
    let mut hash = Sha256::new();
    hash.update(&letter.body);
    let p = &letter.properties;
    for part in [
        p.message_id().as_ref().map(|s| s.as_str().to_owned()),
        letter.stage.clone(),
        letter.error.clone(),
        letter.attempts.map(|a| a.to_string()),
        letter.failed_at.map(|t| t.to_rfc3339()),
    ] {
        hash.update([0]);
        hash.update(part.unwrap_or_default().as_bytes());
    }
    hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a replay of `selection` would move now: the dead letters it takes, in order.
pub fn would_replay<'a>(letters: &'a [DeadLetter], selection: &Selection) -> Vec<&'a DeadLetter> {
    letters
        .iter()
        .filter(|l| selection.matches(l))
        .take(selection.limit.unwrap_or(usize::MAX))
        .collect()
}

/// Moves the selected dead letters back to their stage queue (see [`dlq::replay`]): each is
/// published, confirmed, then acknowledged in the dead-letter queue. `on_each` runs between.
pub async fn replay(
    conn: &Connection,
    stage: StageQueue,
    selection: &Selection,
    on_each: impl FnMut(&DeadLetter) -> ControlFlow<()>,
) -> Result<ReplayReport, DlqError> {
    let selected = |l: &DeadLetter| selection.matches(l);
    dlq::replay_where(conn, stage, selected, selection.limit, on_each).await
}

/// Deletes the selected dead letters; the others stay, in order.
pub async fn purge(
    conn: &Connection,
    stage: StageQueue,
    selection: &Selection,
) -> Result<usize, DlqError> {
    if selection.is_everything() {
        return dlq::purge(conn, stage, None).await;
    }
    dlq::purge_where(conn, stage, |l| selection.matches(l)).await
}

/// How long ago `at` was, in one short unit: `42s`, `17m`, `5h`, `3d`.
pub fn age(at: DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(booking: &str, error: &str) -> DeadLetter {
        DeadLetter {
            booking_id: Some(booking.into()),
            error: Some(error.into()),
            stage: Some("provision-due".into()),
            attempts: Some(1),
            failed_at: None,
            properties: Default::default(),
            body: format!(r#"{{"booking_id":"{booking}"}}"#).into_bytes(),
        }
    }

    #[test]
    fn filters_narrow_and_combine() {
        let letters = [
            letter("a", "InvalidSubnetID.NotFound"),
            letter("b", "no capacity"),
            letter("a", "No Capacity"),
        ];
        let by_error = Selection {
            error_contains: Some("capacity".into()),
            ..Default::default()
        };
        assert_eq!(would_replay(&letters, &by_error).len(), 2);
        let both = Selection {
            booking_id: Some("a".into()),
            ..by_error.clone()
        };
        assert_eq!(would_replay(&letters, &both).len(), 1);
        let limited = Selection {
            limit: Some(1),
            ..by_error
        };
        assert_eq!(
            would_replay(&letters, &limited)[0].booking_id.as_deref(),
            Some("b")
        );
        assert!(Selection::default().is_everything());
        assert!(!Selection::booking(Some("a")).is_everything());
    }

    #[test]
    fn fingerprints_select_single_letters() {
        let (a, b) = (letter("a", "x"), letter("b", "x"));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
        let one = Selection {
            ids: Some([fingerprint(&b)].into()),
            ..Default::default()
        };
        assert!(!one.matches(&a) && one.matches(&b));
    }
}
