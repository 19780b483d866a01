//! `labbook status BOOKING_ID`: what is stored about a booking, never a password.

use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::config::Settings;
use crate::domain::Cost;
use crate::store::emails::EmailRecord;
use crate::store::events::{self, HistoryEntry};
use crate::store::schedule::Entry;
use crate::store::{BookingRecord, Store, bookings, emails, machines, schedule, slots};

#[derive(Serialize)]
struct Status {
    booking: BookingRecord,
    ends_at: String,
    /// The trace it was stored under (W3C Trace Context), if it has one.
    trace_id: Option<String>,
    usernames: Vec<String>,
    schedule: Vec<Entry>,
    instances: Vec<Instance>,
    emails: Vec<EmailRecord>,
    history: Vec<HistoryEntry>,
    cost: Cost,
}

#[derive(Serialize)]
struct Instance {
    slot: i32,
    instance_id: Option<String>,
    state: Option<String>,
    address: Option<String>,
    usernames: Vec<String>,
    admin_username: String,
    /// When the boot watch saw it ready (`None`: booting, or not launched).
    ready_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Launch to ready, in seconds.
    boot_seconds: Option<i64>,
    /// The AMI it booted from.
    image_id: Option<String>,
    /// Why it serves its lab over plain HTTP, if it does.
    http_only: Option<String>,
}

pub async fn run(settings: &Settings, booking_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::connect(settings.database_url.expose_secret())
        .await
        .context("cannot connect to the database")?;
    let pool = &store.pool;
    let Some(booking) = bookings::find(pool, booking_id).await? else {
        let kept = crate::store::intake::tombstone(&mut *pool.acquire().await?, booking_id).await?;
        match kept {
            Some(r) => eprintln!(
                "booking {booking_id}: not found (a cancellation at revision {r} is kept for it: it will not be booked at that revision or below)"
            ),
            None => eprintln!("booking {booking_id}: not found"),
        }
        return Ok(ExitCode::FAILURE);
    };
    let creds = bookings::credentials(pool, booking_id).await?;
    let instances = slots::for_booking(pool, booking_id)
        .await?
        .into_iter()
        .map(|s| Instance {
            slot: s.slot,
            usernames: creds
                .iter()
                .filter(|c| s.user_positions().contains(&c.position))
                .map(|c| c.username.clone())
                .collect(),
            address: s.address().map(str::to_owned),
            boot_seconds: s
                .ready_at
                .zip(s.launched_at)
                .map(|(ready, launched)| (ready - launched).num_seconds()),
            ready_at: s.ready_at,
            image_id: s.image_id,
            http_only: s.http_only,
            instance_id: s.instance_id,
            state: s.instance_state,
            admin_username: s.admin_username,
        })
        .collect();
    let usage = machines::usage(pool, booking_id).await?;
    let cost = Cost::of(&usage, &settings.ec2.prices);
    let trace_id = booking
        .traceparent
        .as_deref()
        .and_then(|tp| crate::broker::trace::TraceContext::parse(tp, None))
        .map(|ctx| ctx.trace_id().to_owned());
    let status = Status {
        trace_id,
        ends_at: crate::format_time(booking.ends_at()),
        usernames: creds.into_iter().map(|c| c.username).collect(),
        schedule: schedule::for_booking(pool, booking_id).await?,
        emails: emails::for_booking(pool, booking_id).await?,
        history: events::history(pool, booking_id).await?,
        instances,
        booking,
        cost,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(s: &Status) {
    let b = &s.booking;
    let t = crate::format_time;
    println!("booking    {}", b.booking_id);
    println!("state      {}", b.state);
    let cancelled = if b.cancelled { " (cancelled)" } else { "" };
    println!("revision   {}{cancelled}", b.revision);
    if let Some(reason) = &b.failure_reason {
        println!("failure    {reason}");
    }
    println!("email      {}", b.email);
    println!("time       {} to {}", t(b.booking_time), s.ends_at);
    println!(
        "users      {}: {}",
        b.number_of_users,
        s.usernames.join(", ")
    );
    println!("received   {}", t(b.created_at));
    if let Some(trace_id) = &s.trace_id {
        println!("trace      {trace_id}");
    }
    for e in &s.schedule {
        let done = e
            .published_at
            .map_or_else(|| "pending".to_owned(), |p| format!("published {}", t(p)));
        println!(
            "schedule   {:<10} due {}  {done}",
            e.action.as_str(),
            t(e.due_at)
        );
    }
    for i in &s.instances {
        println!(
            "instance   #{} {} {} {}  users: {}  admin: {}",
            i.slot,
            i.instance_id.as_deref().unwrap_or("(not launched)"),
            i.state.as_deref().unwrap_or("-"),
            i.address
                .as_deref()
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|| "-".into()),
            i.usernames.join(", "),
            i.admin_username
        );
        let boot = match (i.ready_at, i.boot_seconds) {
            (Some(at), Some(secs)) => format!("ready {} ({secs} s after its launch)", t(at)),
            _ if i.instance_id.is_some() => "booting".to_owned(),
            _ => continue,
        };
        let image = i.image_id.as_deref().unwrap_or("-");
        let http = i
            .http_only
            .as_deref()
            .map(|why| format!("  HTTP only: {why}"))
            .unwrap_or_default();
        println!("           {boot}  image {image}{http}");
    }
    let cost = s
        .cost
        .estimated_cost
        .map(|usd| format!(", about {usd:.2} USD (an estimate from LABBOOK_PRICES)"))
        .unwrap_or_default();
    println!("machines   {:.2} machine-hours{cost}", s.cost.machine_hours);
    print_emails_and_history(s);
}

fn print_emails_and_history(s: &Status) {
    let t = crate::format_time;
    for e in &s.emails {
        let state = match (&e.sent_at, &e.last_error) {
            (Some(at), _) => format!("sent {}", t(*at)),
            (None, Some(err)) => format!("failed: {err}"),
            (None, None) => "not sent yet".into(),
        };
        let rev = match e.revision {
            0 => String::new(),
            r => format!(" r{r}"),
        };
        println!(
            "email      {:<17} {state}",
            format!("{}{rev}", e.kind.as_str())
        );
    }
    for h in &s.history {
        let state = h.state.as_deref().unwrap_or("-");
        println!(
            "history    {}  {:<11} r{:<3} {state:<12} {}",
            t(h.at),
            h.event,
            h.revision,
            h.detail
        );
    }
}
