//! `labbook dlq list|show|replay|purge QUEUE`: the operator's view of dead letters.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::Connection;

use crate::broker::StageQueue;
use crate::broker::dlq::{self, DeadLetter};
use crate::config::Settings;
use crate::ops::dlq::{Selection, age, stage_of, would_replay};

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
        /// Only the dead letters whose error contains TEXT (ignoring case).
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
    },
    /// Move dead letters back to their stage queue with the attempt count reset. Each is
    /// published (confirmed) before it leaves the DLQ: an interrupted replay loses nothing.
    Replay {
        /// A stage queue (`booking-created`, ...) or its `.dlq` name.
        queue: String,
        /// Only the dead letters of this booking.
        #[arg(long)]
        booking_id: Option<String>,
        /// Only the dead letters whose error contains TEXT (ignoring case).
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
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
        /// Only the dead letters whose error contains TEXT (ignoring case).
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let queue = match &command {
        DlqCommand::List { queue } | DlqCommand::Show { queue, .. } => queue,
        DlqCommand::Replay { queue, .. } | DlqCommand::Purge { queue, .. } => queue,
    };
    let stage = stage_of(queue)?;
    let (conn, channel) = super::open_broker(settings, "labbook dlq").await?;
    let _ = channel.close(200, "done".into()).await;

    let select = |booking_id: Option<String>, error_contains, limit| Selection {
        booking_id,
        error_contains,
        limit,
        ids: None,
    };
    let code = match command {
        DlqCommand::List { .. } => list(&conn, stage).await?,
        DlqCommand::Show {
            booking_id, error, ..
        } => show(&conn, stage, &select(booking_id, error, None)).await?,
        DlqCommand::Replay {
            booking_id,
            error,
            limit,
            dry_run,
            ..
        } => {
            let selection = select(booking_id, error, limit);
            if dry_run {
                replay_dry_run(&conn, stage, &selection).await?
            } else {
                replay(&conn, stage, &selection).await?
            }
        }
        DlqCommand::Purge {
            booking_id,
            error,
            yes,
            ..
        } => purge(&conn, stage, &select(booking_id, error, None), yes).await?,
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
    selection: &Selection,
) -> anyhow::Result<ExitCode> {
    let letters = dlq::read_all(conn, stage).await?;
    let shown: Vec<&DeadLetter> = letters.iter().filter(|l| selection.matches(l)).collect();
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
    selection: &Selection,
) -> anyhow::Result<ExitCode> {
    let letters = dlq::read_all(conn, stage).await?;
    let moving = would_replay(&letters, selection);
    for l in &moving {
        println!(
            "would replay {} ({})",
            l.booking_id.as_deref().unwrap_or("-"),
            l.error.as_deref().unwrap_or("-")
        );
    }
    println!(
        "dry run: {} dead letter(s) would go back to {}",
        moving.len(),
        stage.name()
    );
    Ok(ExitCode::SUCCESS)
}

/// `dlq replay`: moves dead letters back to their stage queue, with a progress bar.
async fn replay(
    conn: &Connection,
    stage: StageQueue,
    selection: &Selection,
) -> anyhow::Result<ExitCode> {
    let total = dlq::depth(conn, &stage.dlq()).await? as u64;
    let bar = progress(selection.limit.map_or(total, |n| total.min(n as u64)));
    let report = crate::ops::dlq::replay(conn, stage, selection, |_| {
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
    selection: &Selection,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    let letters = dlq::read_all(conn, stage).await?;
    let n = letters.iter().filter(|l| selection.matches(l)).count();
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
    let removed = crate::ops::dlq::purge(conn, stage, selection).await?;
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
