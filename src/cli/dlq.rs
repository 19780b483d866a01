//! `labbook dlq list|show|replay|purge QUEUE`: the operator's view of dead letters.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::{Context, bail};
use chrono::Utc;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::Connection;

use crate::broker::StageQueue;
use crate::broker::dlq::{self, DeadLetter};
use crate::config::Settings;

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// One line per dead letter: booking id, attempts, when it failed, age, error; then a count.
    List {
        /// A stage queue (`booking-created`, ...) or its `.dlq` name.
        queue: String,
    },
    /// Headers and body of the dead letters (those of one booking with --booking-id).
    Show {
        /// A stage queue (`booking-created`, ...) or its `.dlq` name.
        queue: String,
        /// Only the dead letters of this booking.
        #[arg(long)]
        booking_id: Option<String>,
    },
    /// Move dead letters back to their stage queue with the attempt count reset. Each is
    /// published (confirmed) before it leaves the DLQ: an interrupted replay loses nothing.
    Replay {
        /// A stage queue (`booking-created`, ...) or its `.dlq` name.
        queue: String,
        /// Only the dead letters of this booking.
        #[arg(long)]
        booking_id: Option<String>,
        /// Replay at most N messages.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters (those of one booking with --booking-id). Asks first unless --yes.
    Purge {
        /// A stage queue (`booking-created`, ...) or its `.dlq` name.
        queue: String,
        /// Only the dead letters of this booking.
        #[arg(long)]
        booking_id: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

fn stage_of(queue: &str) -> anyhow::Result<StageQueue> {
    StageQueue::parse(queue).with_context(|| {
        let names: Vec<&str> = StageQueue::ALL.iter().map(|q| q.name()).collect();
        format!(
            "unknown queue {queue:?}: use one of {} (or its .dlq name)",
            names.join(", ")
        )
    })
}

pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let queue = match &command {
        DlqCommand::List { queue } | DlqCommand::Show { queue, .. } => queue,
        DlqCommand::Replay { queue, .. } | DlqCommand::Purge { queue, .. } => queue,
    };
    let stage = stage_of(queue)?;
    let (conn, channel) = super::open_broker(settings, "labbook dlq").await?;
    let _ = channel.close(200, "done".into()).await;

    let code = match command {
        DlqCommand::List { .. } => list(&conn, stage).await?,
        DlqCommand::Show { booking_id, .. } => show(&conn, stage, booking_id.as_deref()).await?,
        DlqCommand::Replay {
            booking_id,
            limit,
            dry_run: true,
            ..
        } => replay_dry_run(&conn, stage, booking_id.as_deref(), limit).await?,
        DlqCommand::Replay {
            booking_id, limit, ..
        } => replay(&conn, stage, booking_id.as_deref(), limit).await?,
        DlqCommand::Purge {
            booking_id, yes, ..
        } => purge(&conn, stage, booking_id.as_deref(), yes).await?,
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(code)
}

/// `dlq list`: one line per dead letter, then a count.
async fn list(conn: &Connection, stage: StageQueue) -> anyhow::Result<ExitCode> {
    let letters = dlq::read_all(conn, stage).await?;
    println!(
        "{:<28} {:>8}  {:<20} {:>6}  ERROR",
        "BOOKING ID", "ATTEMPTS", "FAILED AT", "AGE"
    );
    for l in &letters {
        println!(
            "{:<28} {:>8}  {:<20} {:>6}  {}",
            l.booking_id.as_deref().unwrap_or("-"),
            l.attempts.map_or("-".into(), |a| a.to_string()),
            l.failed_at.map_or("-".into(), crate::format_time),
            l.failed_at.map_or("-".into(), age),
            l.error.as_deref().unwrap_or("-"),
        );
    }
    println!("{} dead letter(s) in {}", letters.len(), stage.dlq());
    Ok(ExitCode::SUCCESS)
}

/// `dlq show`: headers and body of each dead letter (of one booking if given).
async fn show(
    conn: &Connection,
    stage: StageQueue,
    booking_id: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let letters = dlq::read_all(conn, stage).await?;
    let shown: Vec<&DeadLetter> = letters.iter().filter(|l| l.matches(booking_id)).collect();
    for (i, l) in shown.iter().enumerate() {
        println!("--- {} #{}", stage.dlq(), i + 1);
        print_letter(l);
    }
    println!(
        "{} of {} dead letter(s) in {} shown",
        shown.len(),
        letters.len(),
        stage.dlq()
    );
    Ok(ExitCode::SUCCESS)
}

/// A dead letter's properties and headers, a blank line, then its body.
fn print_letter(l: &DeadLetter) {
    let p = &l.properties;
    if let Some(ct) = p.content_type() {
        println!("content-type: {ct}");
    }
    if let Some(id) = p.message_id() {
        println!("message-id: {id}");
    }
    if let Some(id) = p.correlation_id() {
        println!("correlation-id: {id}");
    }
    if let Some(headers) = p.headers() {
        for (k, _) in headers {
            let v = crate::broker::headers::str_header(p, k.as_str()).unwrap_or_default();
            println!("{k}: {v}");
        }
    }
    println!();
    println!("{}", String::from_utf8_lossy(&l.body));
}

/// `dlq replay --dry-run`: what would be replayed; changes nothing.
async fn replay_dry_run(
    conn: &Connection,
    stage: StageQueue,
    booking_id: Option<&str>,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let letters = dlq::read_all(conn, stage).await?;
    let mut n = 0;
    for l in letters.iter().filter(|l| l.matches(booking_id)) {
        if limit.is_some_and(|max| n >= max) {
            break;
        }
        n += 1;
        println!(
            "would replay {} ({})",
            l.booking_id.as_deref().unwrap_or("-"),
            l.error.as_deref().unwrap_or("-")
        );
    }
    println!(
        "dry run: {n} dead letter(s) would go back to {}",
        stage.name()
    );
    Ok(ExitCode::SUCCESS)
}

/// `dlq replay`: moves dead letters back to their stage queue, with a progress bar.
async fn replay(
    conn: &Connection,
    stage: StageQueue,
    booking_id: Option<&str>,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let total = dlq::depth(conn, &stage.dlq()).await? as u64;
    let bar = progress(limit.map_or(total, |n| total.min(n as u64)));
    let report = dlq::replay(conn, stage, booking_id, limit, |_| {
        bar.inc(1);
        ControlFlow::Continue(())
    })
    .await?;
    bar.finish_and_clear();
    println!(
        "replayed {} dead letter(s) to {} ({} left in {})",
        report.replayed,
        stage.name(),
        report.skipped,
        stage.dlq()
    );
    Ok(ExitCode::SUCCESS)
}

/// `dlq purge`: deletes dead letters after asking (unless `--yes`).
async fn purge(
    conn: &Connection,
    stage: StageQueue,
    booking_id: Option<&str>,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    let letters = dlq::read_all(conn, stage).await?;
    let n = letters.iter().filter(|l| l.matches(booking_id)).count();
    if n == 0 {
        println!("nothing to purge in {}", stage.dlq());
        return Ok(ExitCode::SUCCESS);
    }
    if !yes
        && !confirm(&format!(
            "delete {n} dead letter(s) from {} for good?",
            stage.dlq()
        ))?
    {
        println!("nothing deleted");
        return Ok(ExitCode::FAILURE);
    }
    let removed = dlq::purge(conn, stage, booking_id).await?;
    println!("deleted {removed} dead letter(s) from {}", stage.dlq());
    Ok(ExitCode::SUCCESS)
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("{question} Not asking without a terminal: pass --yes");
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn progress(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} replayed ({per_sec}, {eta} left)")
            .expect("valid template"),
    );
    bar
}

fn age(at: chrono::DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
