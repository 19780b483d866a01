//! The consumer runtime under a dropped broker connection.

use std::time::Duration;

use labbook::startup::Worker;

use crate::helpers::{TestEnv, booking_json};

#[tokio::test]
async fn the_consumer_reconnects_after_the_connection_is_dropped() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    env.publish_booking(&booking_json("before-drop", 1, 24))
        .await;
    assert_eq!(
        env.take("credentials-ready", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );

    env.drop_connections();
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.publish_booking(&booking_json("after-drop", 1, 24))
        .await;
    let ready = env
        .take("credentials-ready", 1, Duration::from_secs(30))
        .await;
    assert_eq!(
        ready.len(),
        1,
        "the worker came back and handled the new booking"
    );
    env.stop().await;
}
