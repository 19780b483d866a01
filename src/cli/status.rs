//! `labbook status BOOKING_ID`: what is stored about a booking, never a password.

use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::config::Settings;
use crate::store::{BookingRecord, Store, bookings};

#[derive(Serialize)]
struct Status {
    booking: BookingRecord,
    ends_at: String,
    usernames: Vec<String>,
}

pub async fn run(settings: &Settings, booking_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database_url)
        .await
        .context("cannot connect to the database")?;
    let Some(booking) = bookings::find(&store.pool, booking_id).await? else {
        eprintln!("booking {booking_id}: not found");
        return Ok(ExitCode::FAILURE);
    };
    let usernames = bookings::credentials(&store.pool, booking_id)
        .await?
        .into_iter()
        .map(|c| c.username)
        .collect();
    let status = Status {
        ends_at: crate::format_time(booking.ends_at()),
        booking,
        usernames,
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
    println!("booking   {}", b.booking_id);
    println!("state     {}", b.state);
    if let Some(reason) = &b.failure_reason {
        println!("failure   {reason}");
    }
    println!("email     {}", b.email);
    println!(
        "time      {} to {}",
        crate::format_time(b.booking_time),
        s.ends_at
    );
    println!(
        "users     {} ({})",
        b.number_of_users,
        s.usernames.join(", ")
    );
    println!("received  {}", crate::format_time(b.created_at));
}
