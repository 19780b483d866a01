//! Stage messages a step decided on, written in the step's own transaction and published once
//! it has committed: a consumer never sees a message before the state it follows, and a
//! process that dies between the commit and the publish leaves the row for another to publish
//! (downstream is idempotent, so a message published twice does no harm).

use sqlx::PgConnection;

use crate::broker::{Outgoing, Route, StageQueue};

/// Keeps `message` to be published after the transaction commits; returns its row.
pub async fn put(tx: &mut PgConnection, message: &Outgoing) -> Result<i64, sqlx::Error> {
    let Route::Stage(queue) = &message.route else {
        unreachable!("the stage outbox holds stage messages only");
    };
    sqlx::query_scalar(
        "INSERT INTO stage_outbox (queue, message_id, body, traceparent) VALUES ($1, $2, $3, $4)
         RETURNING id",
    )
    .bind(queue.name())
    .bind(&message.message_id)
    .bind(&message.body)
    .bind(message.trace.as_ref().map(|t| t.traceparent()))
    .fetch_one(tx)
    .await
}

/// Forgets rows once their messages are confirmed.
pub async fn sent<'e>(db: impl sqlx::PgExecutor<'e>, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM stage_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(db)
        .await?;
    Ok(())
}

/// A row as stored: id, queue, message id, body, traceparent.
type Row = (i64, String, String, Vec<u8>, Option<String>);

/// Locks up to `limit` rows left for longer than `seconds` (their process died before it
/// published them) for this transaction.
pub async fn claim_left(
    tx: &mut PgConnection,
    seconds: f64,
    limit: i64,
) -> Result<Vec<(i64, Outgoing)>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, queue, message_id, body, traceparent FROM stage_outbox
         WHERE created_at < now() - make_interval(secs => $1)
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(seconds)
    .bind(limit)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, queue, message_id, body, traceparent)| {
            let queue = StageQueue::parse(&queue)?;
            Some((
                id,
                Outgoing {
                    route: Route::Stage(queue),
                    message_id,
                    body,
                    trace: None,
                }
                .traced(traceparent.as_deref()),
            ))
        })
        .collect())
}
