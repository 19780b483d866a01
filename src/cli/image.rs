//! `labbook image build|list|prune`: this installation's baked machine images.
//!
//! `build` launches one image builder from `LABBOOK_BASE_AMI_ID` whose user-data
//! ([`userdata::render_image`]) installs what the bootstrap would install at every boot, then
//! reads the builder's serial console for the bake's report (`labbook-image: ok`), as the boot
//! watch reads a lab machine's. Then it stops the builder, makes an image of it, waits until the
//! image is available and terminates the builder. Whatever ends a build (an error, the timeout,
//! SIGINT/SIGTERM) terminates its builder; a build finds and terminates the builders an
//! interrupted one left.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::Subcommand;

use crate::config::Settings;
use crate::ec2::images::{ImageInfo, TAG_HOLDS, TAG_VERSION};
use crate::ec2::userdata::{self, IMAGE_REPORT_OK};
use crate::ec2::{Ec2, Ec2Error, TAG_INSTALLATION, TAG_MANAGED};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Bake an image (AMI) for this installation, then print the LABBOOK_AMI_ID to set.
    ///
    /// Launches one builder instance from LABBOOK_BASE_AMI_ID (an Ubuntu LTS that The Littlest
    /// JupyterHub supports), tagged labbook:role=image-builder, in labbook's security group and
    /// subnet. Its user-data upgrades the system, installs The Littlest JupyterHub and the
    /// pinned certbot as every machine's bootstrap does (no trainee or admin account), writes
    /// /etc/labbook/baked, clears what must not be shared (cloud-init state, SSH host keys,
    /// machine id, logs) and reports on the serial console. labbook reads the console until the
    /// report, stops the builder, makes the image `labbook-<installation>-<UTC time>` (tagged
    /// with labbook's version and what it holds, as are its snapshots), waits until it is
    /// available and terminates the builder. About 15 minutes.
    ///
    /// Safe to run again: builders an interrupted build left are terminated first. Ctrl-C or
    /// SIGTERM terminates the builder before labbook exits. Needs LABBOOK_BASE_AMI_ID and AWS
    /// credentials allowed the image statements of deploy/iam-policy.json.
    Build {
        /// Give up after this many minutes (launch to available image): the builder is
        /// terminated and no image is kept.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=1440))]
        timeout_minutes: u64,
    },
    /// List this installation's images, newest first: id, name, created, state, labbook
    /// version.
    List {
        /// Machine-readable JSON (with what each holds and its snapshots).
        #[arg(long)]
        json: bool,
    },
    /// Deregister all but the newest images of this installation and delete their snapshots.
    ///
    /// The image LABBOOK_AMI_ID names is never removed.
    Prune {
        /// How many of the newest images to keep (at least 1).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        keep: u64,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(settings: &Settings, command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build { timeout_minutes } => {
            build(settings, Duration::from_secs(timeout_minutes * 60)).await
        }
        ImageCommand::List { json } => list(settings, json).await,
        ImageCommand::Prune { keep, dry_run } => prune(settings, keep as usize, dry_run).await,
    }
}

/// An EC2 client whose rate limits are the database's shared buckets (those the provisioner
/// replicas take from), or this process's own where the database cannot be reached.
async fn client(settings: &Settings) -> Ec2 {
    let url = settings.database_url.expose_secret();
    let shared = async {
        let store = crate::store::Store::connect(url).await.ok()?;
        sqlx::query("SELECT 1 FROM ec2_rate LIMIT 1")
            .fetch_optional(&store.pool)
            .await
            .ok()?;
        Some(store)
    };
    match tokio::time::timeout(Duration::from_secs(10), shared).await {
        Ok(Some(store)) => Ec2::with_pool(settings.ec2.clone(), store.pool).await,
        _ => {
            eprintln!(
                "note: the database (DATABASE_URL) cannot be reached: EC2 calls keep to this process's own rate limits"
            );
            Ec2::new(settings.ec2.clone()).await
        }
    }
}

/// `12m04s`, `45s`.
fn took(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The image's name: `labbook-<installation>-<UTC time of the build's start>`.
pub fn image_name(installation: &str, at: DateTime<Utc>) -> String {
    format!("labbook-{installation}-{}", at.format("%Y%m%dT%H%M%SZ"))
}

/// The tags of a baked image and its snapshots.
fn image_tags(installation: &str, name: &str) -> Vec<(&'static str, String)> {
    vec![
        (TAG_MANAGED, "true".to_owned()),
        (TAG_INSTALLATION, installation.to_owned()),
        (TAG_VERSION, env!("CARGO_PKG_VERSION").to_owned()),
        (TAG_HOLDS, userdata::image_holds()),
        ("Name", name.to_owned()),
    ]
}

/// Prints a line about every 30 s while something is waited for.
struct Progress {
    started: Instant,
    last: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(30);

    fn due(&mut self) -> bool {
        if self.last.elapsed() >= Self::EVERY {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }

    fn elapsed(&self) -> String {
        took(self.started.elapsed())
    }

    /// Between looks: 1 s, growing with the time waited to 15 s.
    fn pause(&self) -> Duration {
        (self.started.elapsed() / 10).clamp(Duration::from_secs(1), Duration::from_secs(15))
    }
}

/// What a build started: its builder once launched, its image once asked for. Read after the
/// build ends, however it ends.
#[derive(Default)]
struct Made {
    builder: Mutex<Option<String>>,
    image: Mutex<Option<String>>,
}

async fn build(settings: &Settings, timeout: Duration) -> anyhow::Result<ExitCode> {
    let base = settings.require_base_ami_id()?.to_owned();
    let user_data = userdata::render_image().map_err(anyhow::Error::msg)?;
    let ec2 = client(settings).await;
    let started = Instant::now();
    let at = Utc::now();

    let left = ec2
        .find_builders()
        .await
        .context("looking for image builders left by an interrupted build")?;
    if !left.is_empty() {
        let ids: Vec<String> = left.iter().map(|i| i.instance_id.clone()).collect();
        println!(
            "terminating {} image builder(s) left by an interrupted build: {}",
            ids.len(),
            ids.join(", ")
        );
        ec2.terminate(&ids)
            .await
            .context("terminating the builders left by an interrupted build")?;
    }

    let made = Made::default();
    let baking = bake(settings, &ec2, &base, &user_data, at, timeout, &made);
    let outcome = tokio::select! {
        outcome = baking => outcome,
        () = crate::startup::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let builder = made.builder.lock().expect("lock").clone();
    let image = made.image.lock().expect("lock").clone();

    // Whatever happened, the builder goes; after a failure, so does any builder of this
    // installation (one launched while the answer was lost) and the unfinished image.
    let mut doomed: Vec<String> = builder.iter().cloned().collect();
    if outcome.is_err()
        && let Ok(found) = ec2.find_builders().await
    {
        doomed.extend(found.into_iter().map(|i| i.instance_id));
        doomed.sort();
        doomed.dedup();
    }
    let terminated = ec2.terminate(&doomed).await;
    let builder_note = match (&terminated, doomed.is_empty()) {
        (_, true) => "no builder was launched".to_owned(),
        (Ok(()), false) => format!("builder {} terminated", doomed.join(", ")),
        (Err(err), false) => format!(
            "the builder {} could not be terminated ({err}): terminate it by hand",
            doomed.join(", ")
        ),
    };
    match outcome {
        Ok(image_id) => {
            terminated.with_context(|| {
                format!("the image {image_id} is available, but terminating the builder failed")
            })?;
            let name = image_name(&settings.ec2.installation, at);
            println!("{builder_note}");
            println!(
                "image {image_id} ({name}) is available, made in {}",
                took(started.elapsed())
            );
            println!("to launch lab machines from it, set:");
            println!("LABBOOK_AMI_ID={image_id}");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            let image_note = match image {
                None => "no image was made".to_owned(),
                Some(id) => match ec2.deregister_image(&id).await {
                    Ok(()) => format!("the unfinished image {id} was deregistered"),
                    Err(e) => format!("the unfinished image {id} could not be deregistered ({e})"),
                },
            };
            bail!("{err:#}; {builder_note}, {image_note}")
        }
    }
}

/// The build from launch to an available image; returns its id.
async fn bake(
    settings: &Settings,
    ec2: &Ec2,
    base: &str,
    user_data: &str,
    at: DateTime<Utc>,
    timeout: Duration,
    made: &Made,
) -> anyhow::Result<String> {
    let installation = &settings.ec2.installation;
    let deadline = Instant::now() + timeout;
    // One build, one token: a launch retried after a lost answer gets the same instance.
    let token = format!("labbook-image-{installation}-{}", at.timestamp());
    let id = ec2
        .launch_builder(base, user_data, &token)
        .await
        .context("launching the image builder")?;
    *made.builder.lock().expect("lock") = Some(id.clone());
    println!(
        "launched the image builder {id} ({}) from {base}; waiting for its report (at most {} min)",
        settings.ec2.instance_type,
        timeout.as_secs() / 60
    );
    let mut progress = Progress {
        started: Instant::now(),
        last: Instant::now(),
    };
    wait_for_report(ec2, &id, deadline, timeout, &mut progress).await?;
    println!(
        "{}: the builder reported \"{IMAGE_REPORT_OK}\"; stopping it",
        progress.elapsed()
    );
    ec2.stop(&id).await.context("stopping the builder")?;
    wait_stopped(ec2, &id, deadline, timeout, &mut progress).await?;

    let name = image_name(installation, at);
    let description = format!(
        "labbook {}: {}, baked from {base}",
        env!("CARGO_PKG_VERSION"),
        userdata::image_holds()
    );
    let tags = image_tags(installation, &name);
    let image_id = ec2
        .create_image(&id, &name, &description, &tags)
        .await
        .context("creating the image")?;
    *made.image.lock().expect("lock") = Some(image_id.clone());
    println!(
        "{}: the builder is stopped; making the image {image_id} ({name})",
        progress.elapsed()
    );
    wait_available(ec2, &image_id, deadline, timeout, &mut progress).await?;
    Ok(image_id)
}

fn timed_out(what: &str, timeout: Duration) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} within {} min (--timeout-minutes)",
        timeout.as_secs() / 60
    )
}

/// A failed EC2 read while waiting: a permanent refusal ends the wait, anything else is waited
/// out (said once).
fn tolerate(err: Ec2Error, what: &str, said: &mut bool) -> anyhow::Result<()> {
    if err.is_permanent() {
        return Err(anyhow::Error::new(err).context(what.to_owned()));
    }
    if !std::mem::replace(said, true) {
        eprintln!("note: {what}: {err}; trying again");
    }
    Ok(())
}

/// Reads the builder's console (live, `Latest=true`; the buffered copy where EC2 refuses that
/// for the instance type) until the bake reports.
async fn wait_for_report(
    ec2: &Ec2,
    id: &str,
    deadline: Instant,
    timeout: Duration,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let (mut latest, mut said) = (true, false);
    loop {
        if Instant::now() >= deadline {
            return Err(timed_out("the builder did not report", timeout));
        }
        let state = match ec2.describe(&[id.to_owned()]).await {
            Ok(found) => found.into_iter().next().map(|i| i.state),
            Err(err) => {
                tolerate(err, "reading the builder's state", &mut said)?;
                None
            }
        };
        if let Some(state) = state.as_deref()
            && matches!(
                state,
                "shutting-down" | "terminated" | "stopping" | "stopped"
            )
        {
            bail!("the builder {id} is {state} before it reported: something else stopped it");
        }
        let text = match ec2.console_output(id, latest).await {
            Ok(out) => out.text,
            Err(err) if latest && err.refuses_latest_console() => {
                eprintln!(
                    "note: EC2 serves no live console for this instance type: reading the copy it buffers, which lags"
                );
                latest = false;
                continue;
            }
            Err(err) => {
                tolerate(err, "reading the builder's console", &mut said)?;
                String::new()
            }
        };
        match userdata::image_outcome(&text) {
            Some(Ok(())) => return Ok(()),
            Some(Err(step)) => bail!("the image bake failed: {step}"),
            None => {}
        }
        if progress.due() {
            let last = last_line(&text);
            println!(
                "{}: the builder is {}, baking{}",
                progress.elapsed(),
                state.as_deref().unwrap_or("not visible yet"),
                if last.is_empty() {
                    String::new()
                } else {
                    format!(" (console: {last})")
                }
            );
        }
        tokio::time::sleep(progress.pause()).await;
    }
}

/// The console's last line with text, printable characters only, at most 100 of them.
fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect::<String>()
        .trim()
        .to_owned()
}

async fn wait_stopped(
    ec2: &Ec2,
    id: &str,
    deadline: Instant,
    timeout: Duration,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        if Instant::now() >= deadline {
            return Err(timed_out("the builder did not stop", timeout));
        }
        match ec2.describe(&[id.to_owned()]).await {
            Ok(found) => match found.first().map(|i| i.state.as_str()) {
                Some("stopped") => return Ok(()),
                Some(state @ ("shutting-down" | "terminated")) => {
                    bail!("the builder {id} is {state}: something else terminated it")
                }
                state => {
                    if progress.due() {
                        println!(
                            "{}: the builder is {}",
                            progress.elapsed(),
                            state.unwrap_or("not visible")
                        );
                    }
                }
            },
            Err(err) => tolerate(err, "reading the builder's state", &mut said)?,
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn wait_available(
    ec2: &Ec2,
    image_id: &str,
    deadline: Instant,
    timeout: Duration,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        if Instant::now() >= deadline {
            return Err(timed_out(
                &format!("the image {image_id} did not become available"),
                timeout,
            ));
        }
        match ec2.image(image_id).await {
            Ok(Some(image)) if image.state == "available" => return Ok(()),
            Ok(Some(image)) if image.state != "pending" => {
                bail!(
                    "EC2 could not make the image {image_id}: it is {}",
                    image.state
                )
            }
            Ok(_) => {
                if progress.due() {
                    println!("{}: the image {image_id} is pending", progress.elapsed());
                }
            }
            Err(err) => tolerate(err, "reading the image's state", &mut said)?,
        }
        tokio::time::sleep(Duration::from_secs(5).min(progress.pause())).await;
    }
}

async fn list(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let ec2 = client(settings).await;
    let images = ec2.images().await.context("listing the images")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    if images.is_empty() {
        println!(
            "no images of installation {}: `labbook image build` makes one",
            settings.ec2.installation
        );
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&images));
    Ok(ExitCode::SUCCESS)
}

/// The images as a table: id, name, created, state, labbook version.
fn table(images: &[ImageInfo]) -> String {
    let rows: Vec<[&str; 5]> = images
        .iter()
        .map(|i| {
            [
                i.image_id.as_str(),
                i.name.as_str(),
                i.created.as_str(),
                i.state.as_str(),
                i.version.as_deref().unwrap_or("-"),
            ]
        })
        .collect();
    let header = ["IMAGE", "NAME", "CREATED", "STATE", "VERSION"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn prune(settings: &Settings, keep: usize, dry_run: bool) -> anyhow::Result<ExitCode> {
    let ec2 = client(settings).await;
    let images = ec2.images().await.context("listing the images")?;
    let in_use = settings.ec2.ami_id.as_deref();
    let (kept, beyond) = images.split_at(keep.min(images.len()));
    let (spared, doomed): (Vec<&ImageInfo>, Vec<&ImageInfo>) = beyond
        .iter()
        .partition(|i| Some(i.image_id.as_str()) == in_use);
    let kept_ids: Vec<&str> = kept.iter().map(|i| i.image_id.as_str()).collect();
    println!(
        "{} image(s) of installation {}; keeping the newest {}: {}",
        images.len(),
        settings.ec2.installation,
        kept.len(),
        if kept_ids.is_empty() {
            "none".to_owned()
        } else {
            kept_ids.join(", ")
        }
    );
    for image in spared {
        println!(
            "keeping {} ({}) too: it is LABBOOK_AMI_ID",
            image.image_id, image.name
        );
    }
    if doomed.is_empty() {
        println!("nothing to remove");
        return Ok(ExitCode::SUCCESS);
    }
    for image in &doomed {
        let snapshots = if image.snapshot_ids.is_empty() {
            "no snapshot".to_owned()
        } else {
            format!("snapshot(s) {}", image.snapshot_ids.join(", "))
        };
        if dry_run {
            println!(
                "would remove {} ({}, created {}) and its {snapshots}",
                image.image_id, image.name, image.created
            );
            continue;
        }
        ec2.deregister_image(&image.image_id)
            .await
            .with_context(|| format!("deregistering {}", image.image_id))?;
        for snapshot in &image.snapshot_ids {
            ec2.delete_snapshot(snapshot).await.with_context(|| {
                format!(
                    "deleting the snapshot {snapshot} of the deregistered image {}",
                    image.image_id
                )
            })?;
        }
        println!(
            "removed {} ({}, created {}) and its {snapshots}",
            image.image_id, image.name, image.created
        );
    }
    if dry_run {
        println!(
            "{} image(s) would be removed (--dry-run: nothing was)",
            doomed.len()
        );
    } else {
        println!("removed {} image(s)", doomed.len());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_durations_and_tables_read_well() {
        let at = DateTime::parse_from_rfc3339("2026-12-03T09:05:07Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            image_name("staging", at),
            "labbook-staging-20261203T090507Z"
        );
        assert_eq!(took(Duration::from_secs(45)), "45s");
        assert_eq!(took(Duration::from_secs(724)), "12m04s");
        assert_eq!(last_line("a\nlast one \u{1b}\n\n"), "last one");
        let image = ImageInfo {
            image_id: "ami-1".into(),
            name: "labbook-x-1".into(),
            created: "2026-12-03T09:05:07.000Z".into(),
            state: "available".into(),
            version: Some("0.1.0".into()),
            holds: None,
            snapshot_ids: vec![],
        };
        let shown = table(&[image]);
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[0].starts_with("IMAGE  NAME"), "{shown}");
        assert!(
            lines[1].contains("ami-1  labbook-x-1  2026-12-03T09:05:07.000Z  available  0.1.0"),
            "{shown}"
        );
        let tags = image_tags("x", "labbook-x-1");
        assert!(tags.contains(&(TAG_MANAGED, "true".to_owned())));
        assert!(tags.contains(&(TAG_VERSION, env!("CARGO_PKG_VERSION").to_owned())));
    }
}
