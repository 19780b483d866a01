//! The account's launch budget shared by bookings (docs/contract.md §1 item 8): the earliest
//! booking launches first, and provisioning starts early enough for the launches ahead.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use labbook::startup::Worker;
use labbook::store::schedule::{self, Action};
use labbook::store::slots;

use crate::helpers::{TestEnv, booking_at, eventually, unique_id};

const WAIT: Duration = Duration::from_secs(60);

async fn launched_at(env: &TestEnv, id: &str) -> Vec<DateTime<Utc>> {
    let store = env.store().await;
    slots::for_booking(&store.pool, id)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|s| s.launched_at)
        .collect()
}

#[tokio::test]
async fn a_booking_due_earlier_launches_before_one_that_asked_first() {
    // Two RunInstances a second for the whole account, eight launches of a booking waiting at
    // once; both bookings due now (a long lead).
    let mut env = TestEnv::with(&[
        ("LABBOOK_EC2_RATE_RUN_INSTANCES", "1/2"),
        ("LABBOOK_LAUNCH_CONCURRENCY", "8"),
        ("LABBOOK_PROVISION_LEAD_SECONDS", "7200"),
    ])
    .await;
    env.spawn(&Worker::ALL).await;
    let (big, small) = (unique_id("big-0900"), unique_id("small-0845"));
    let nine = Utc::now() + chrono::Duration::minutes(45);
    env.publish_booking(&booking_at(&big, 30, nine, 60)).await;
    eventually(WAIT, "the big booking launching", || async {
        (launched_at(&env, &big).await.len() >= 2).then_some(())
    })
    .await;
    // A small booking due a quarter of an hour earlier asks while the big one launches.
    let asked = Utc::now();
    let quarter_to = nine - chrono::Duration::minutes(15);
    env.publish_booking(&booking_at(&small, 2, quarter_to, 60))
        .await;
    env.wait_state(&small, "provisioned").await;
    env.wait_state(&big, "provisioned").await;
    let (s, b) = (
        launched_at(&env, &small).await,
        launched_at(&env, &big).await,
    );
    assert_eq!((s.len(), b.len()), (1, 15));
    // Its launch took the account's next token: at most one of the big booking's launches (one
    // already on its way) went between its asking and its launch, though eight were waiting.
    let between = b.iter().filter(|t| **t > asked && **t < s[0]).count();
    assert!(
        between <= 1,
        "{between} launches of the 09:00 booking went ahead of the 08:45 booking's"
    );
    assert!(
        b.iter().filter(|t| **t > s[0]).count() >= 5,
        "the big booking was still launching"
    );
    env.stop().await;
}

#[tokio::test]
async fn provisioning_starts_earlier_by_the_launches_queued_ahead() {
    // EC2's default bucket: 5 at once, then 2 a second; 2 trainees per machine.
    let env = TestEnv::with(&[("LABBOOK_PROVISION_LEAD_SECONDS", "900")]).await;
    let at = Utc::now() + chrono::Duration::hours(3);
    let (first, second) = (unique_id("ahead"), unique_id("behind"));
    env.publish_booking(&booking_at(&first, 50, at, 60)).await;
    env.drain().await;
    let later = at + chrono::Duration::minutes(10);
    env.publish_booking(&booking_at(&second, 40, later, 60))
        .await;
    env.drain().await;
    let store = env.store().await;
    let due = |id: String| {
        let pool = store.pool.clone();
        async move {
            schedule::find(&pool, &id, Action::Provision)
                .await
                .unwrap()
                .unwrap()
                .due_at
        }
    };
    let lead = chrono::Duration::minutes(15);
    // 25 machines: 20 beyond the burst, 10 s at 2 a second.
    assert_eq!(
        due(first).await,
        at.trunc_subsecs(6) - lead - chrono::Duration::seconds(10)
    );
    // 20 machines of its own behind the first booking's 25: 40 beyond the burst, 20 s.
    assert_eq!(
        due(second).await,
        later.trunc_subsecs(6) - lead - chrono::Duration::seconds(20)
    );
}
