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

/// Takes the one message of `queue` and returns it to the queue `times` times, as a channel
/// reset during an alarm or a replay's dry run does; then whether it is still there.
async fn returned_times(channel: &lapin::Channel, queue: &str, times: usize) -> bool {
    use lapin::options::{BasicAckOptions, BasicGetOptions, BasicRejectOptions};
    for n in 0..times {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{queue}: gone after {n} returns"));
        got.reject(BasicRejectOptions { requeue: true })
            .await
            .unwrap();
    }
    match channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        Some(got) => {
            got.ack(BasicAckOptions::default()).await.unwrap();
            true
        }
        None => false,
    }
}

/// Publishes one message straight to `queue` (the default exchange) with a confirm.
async fn put(channel: &lapin::Channel, queue: &str) {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            br#"{"booking_id":"returned","revision":1}"#,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// RabbitMQ 4.x deletes a quorum queue's message returned more than 20 times unless the queue
/// says otherwise (scripts/test-rabbitmq4.sh runs this there); labbook's queues keep it.
#[tokio::test]
async fn a_stage_message_returned_25_times_is_still_there() {
    let env = TestEnv::new().await;
    let (conn, channel) = env.channel().await;
    for queue in ["notify", "booking-created", "notify.dlq"] {
        put(&channel, queue).await;
        assert!(
            returned_times(&channel, queue, 25).await,
            "{queue}: the broker dropped a message returned 25 times"
        );
    }
    conn.close(200, "done".into()).await.ok();
}

/// A stage queue declared by an earlier labbook (no delivery limit) is kept, the workers start
/// on it, and the policy `deploy/rabbitmq-definitions.json` ships gives it the limit.
#[tokio::test]
async fn a_queue_of_an_earlier_labbook_is_kept_and_the_shipped_policy_limits_it() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let mut env = TestEnv::new().await;
    let conn = labbook::broker::connect(&env.amqp_url(), "earlier labbook")
        .await
        .unwrap();
    let old = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for queue in ["notify", "notify.dlq"] {
        old.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        )
        .await
        .unwrap();
    }
    put(&old, "notify").await;

    let definitions: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/rabbitmq-definitions.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let policy = definitions["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "labbook-delivery-limit"))
        .expect("the definitions ship the delivery-limit policy");
    crate::helpers::rabbitmqctl(&[
        "set_policy",
        "-p",
        &env.vhost,
        "--apply-to",
        policy["apply-to"].as_str().unwrap(),
        "labbook-delivery-limit",
        policy["pattern"].as_str().unwrap(),
        &policy["definition"].to_string(),
    ]);

    // labbook's own declaration keeps the queue (and its message) and goes on.
    let (conn2, channel) = env.channel().await;
    assert!(
        returned_times(&channel, "notify", 25).await,
        "the earlier queue, under the policy, dropped a message returned 25 times"
    );
    env.spawn(&[Worker::Credentials]).await;
    env.publish_booking(&booking_json("after-upgrade", 1, 24))
        .await;
    assert_eq!(
        env.take("credentials-ready", 1, Duration::from_secs(20))
            .await
            .len(),
        1,
        "a worker runs on the kept topology"
    );
    conn.close(200, "done".into()).await.ok();
    conn2.close(200, "done".into()).await.ok();
    env.stop().await;
}
