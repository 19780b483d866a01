//! `labbook image build|list|prune` against the EC2 emulator, through the proxy that scripts a
//! machine's console ([`ThrottlingProxy`]). Each test has its own `LABBOOK_INSTALLATION`, so it
//! sees only its own builders and images in the shared emulator.

use std::time::Duration;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

use crate::helpers::{TestEnv, raw_ec2, state_of};
use crate::operations::cli;
use crate::throttling::{BOOTING_CONSOLE, ThrottlingProxy};

const BASE_AMI: &str = "ami-03cf127a";

const BAKED_CONSOLE: &str = "[    3.1] Cloud-init v. 25.1 running 'init-local'\n[  612.4] cloud-init[903]: labbook-image: ok\n";

/// A test's own installation, with the emulator behind the proxy and a base image.
async fn image_env(proxy: &ThrottlingProxy) -> (TestEnv, String) {
    let installation = format!("img-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_INSTALLATION", installation.as_str()),
        ("LABBOOK_BASE_AMI_ID", BASE_AMI),
    ])
    .await;
    (env, installation)
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// The installation's image builders as EC2 shows them, any state.
async fn builders(installation: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    raw_ec2()
        .await
        .describe_instances()
        .filters(tag_filter("labbook:installation", installation))
        .filters(tag_filter("labbook:role", "image-builder"))
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances().to_vec())
        .collect()
}

/// The installation's images as EC2 shows them.
async fn images(installation: &str) -> Vec<aws_sdk_ec2::types::Image> {
    raw_ec2()
        .await
        .describe_images()
        .owners("self")
        .filters(tag_filter("labbook:installation", installation))
        .send()
        .await
        .unwrap()
        .images()
        .to_vec()
}

fn tags_of(tags: &[Tag]) -> std::collections::HashMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn snapshots_of(image: &aws_sdk_ec2::types::Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
        .collect()
}

async fn snapshot_exists(id: &str) -> bool {
    match raw_ec2()
        .await
        .describe_snapshots()
        .snapshot_ids(id)
        .send()
        .await
    {
        Ok(out) => !out.snapshots().is_empty(),
        Err(_) => false,
    }
}

fn all_gone(instances: &[aws_sdk_ec2::types::Instance]) -> bool {
    !instances.is_empty()
        && instances
            .iter()
            .all(|i| matches!(state_of(i).as_str(), "terminated" | "shutting-down"))
}

/// Launches an instance tagged as `installation`'s image builder, as a build would.
async fn launch_tagged_builder(installation: &str) -> String {
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::Instance)
        .tags(Tag::builder().key("labbook:managed").value("true").build())
        .tags(
            Tag::builder()
                .key("labbook:installation")
                .value(installation)
                .build(),
        )
        .tags(
            Tag::builder()
                .key("labbook:role")
                .value("image-builder")
                .build(),
        )
        .build();
    let out = raw_ec2()
        .await
        .run_instances()
        .image_id(BASE_AMI)
        .min_count(1)
        .max_count(1)
        .tag_specifications(tags)
        .send()
        .await
        .unwrap();
    out.instances()[0].instance_id().unwrap().to_owned()
}

/// The `LABBOOK_AMI_ID=` line of a build's output.
fn ami_line(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("LABBOOK_AMI_ID="))
        .unwrap_or_else(|| panic!("no LABBOOK_AMI_ID line in:\n{out}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_reports_ok_makes_a_tagged_available_image_and_list_shows_it() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(BAKED_CONSOLE);
    let (env, installation) = image_env(&proxy).await;

    let (code, out, err) = cli(&env, &["image", "build", "--timeout-minutes", "2"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let image_id = ami_line(&out);
    assert!(image_id.starts_with("ami-"), "{out}");
    assert!(out.contains("is available, made in "), "{out}");
    assert!(err.is_empty(), "nothing on stderr: {err}");

    // The image: available, named for the installation, tagged, and so are its snapshots.
    let found = images(&installation).await;
    assert_eq!(found.len(), 1);
    let image = &found[0];
    assert_eq!(image.image_id(), Some(image_id.as_str()));
    assert_eq!(image.state().map(|s| s.as_str()), Some("available"));
    let name = image.name().unwrap();
    assert!(
        name.starts_with(&format!("labbook-{installation}-")),
        "{name}"
    );
    let tags = tags_of(image.tags());
    let version = env!("CARGO_PKG_VERSION");
    for (k, v) in [
        ("labbook:managed", "true"),
        ("labbook:installation", installation.as_str()),
        ("labbook:version", version),
        ("labbook:holds", "tljh,certbot 5.8.0"),
    ] {
        assert_eq!(tags.get(k).map(String::as_str), Some(v), "{k}: {tags:?}");
    }
    let snapshots = snapshots_of(image);
    assert!(!snapshots.is_empty());
    let described = raw_ec2()
        .await
        .describe_snapshots()
        .set_snapshot_ids(Some(snapshots))
        .send()
        .await
        .unwrap();
    for snapshot in described.snapshots() {
        let tags = tags_of(snapshot.tags());
        assert_eq!(
            tags.get("labbook:managed").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            tags.get("labbook:installation"),
            Some(&installation),
            "{tags:?}"
        );
        assert_eq!(
            tags.get("labbook:version").map(String::as_str),
            Some(version)
        );
    }

    // One builder, launched as labbook launches (base image, IMDSv2, the bake's user-data),
    // stopped for the image, then terminated.
    let launched = builders(&installation).await;
    assert_eq!(launched.len(), 1);
    assert!(all_gone(&launched), "the builder is terminated");
    let builder = &launched[0];
    assert_eq!(builder.image_id(), Some(BASE_AMI));
    assert_eq!(
        builder
            .metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required")
    );
    let user_data = crate::helpers::user_data_of(builder.instance_id().unwrap()).await;
    assert!(user_data.starts_with("#cloud-config\n"));
    assert!(user_data.contains(labbook::ec2::userdata::IMAGE_BAKE_PATH));
    assert_eq!(proxy.counts("RunInstances").0, 1);
    assert_eq!(proxy.counts("StopInstances").0, 1);
    assert_eq!(proxy.counts("CreateImage").0, 1);

    let (code, out, _) = cli(&env, &["image", "list"]);
    assert_eq!(code, Some(0));
    let row = out
        .lines()
        .find(|l| l.starts_with(&image_id))
        .unwrap_or_else(|| panic!("{image_id} in:\n{out}"));
    assert!(
        row.contains(name) && row.contains("available") && row.ends_with(version),
        "{row}"
    );
    let (code, out, _) = cli(&env, &["image", "list", "--json"]);
    assert_eq!(code, Some(0));
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["image_id"], image_id.as_str());
    assert_eq!(listed[0]["version"], version);
    assert_eq!(listed[0]["state"], "available");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_after_an_interrupted_one_terminates_the_builder_left_first() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(BAKED_CONSOLE);
    let (env, installation) = image_env(&proxy).await;
    let left = launch_tagged_builder(&installation).await;
    // Another installation's builder is not this one's to touch.
    let other = format!("{installation}-b");
    let theirs = launch_tagged_builder(&other).await;

    let (code, out, err) = cli(&env, &["image", "build"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let said = out
        .lines()
        .position(|l| l.contains("left by an interrupted build") && l.contains(&left))
        .unwrap_or_else(|| panic!("the left builder named in:\n{out}"));
    let launched = out
        .lines()
        .position(|l| l.starts_with("launched the image builder"))
        .unwrap();
    assert!(said < launched, "terminated before the new launch:\n{out}");
    ami_line(&out);

    let all = builders(&installation).await;
    assert_eq!(all.len(), 2, "the one left and the build's own");
    assert!(all_gone(&all), "both terminated");
    let other_builders = builders(&other).await;
    assert_eq!(state_of(&other_builders[0]), "running");
    raw_ec2()
        .await
        .terminate_instances()
        .instance_ids(theirs)
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_bake_ends_the_build_naming_its_step_and_makes_no_image() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(
        "[  98.0] cloud-init[903]: labbook-image: failed: install The Littlest JupyterHub (exit 1)\n",
    );
    let (env, installation) = image_env(&proxy).await;

    let (code, out, err) = cli(&env, &["image", "build"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    assert!(
        line.contains("the image bake failed: install The Littlest JupyterHub (exit 1)"),
        "{line}"
    );
    assert!(
        line.contains("terminated") && line.contains("no image"),
        "{line}"
    );
    assert!(!out.contains("LABBOOK_AMI_ID="), "{out}");

    let launched = builders(&installation).await;
    assert_eq!(launched.len(), 1);
    assert!(all_gone(&launched), "the builder is terminated");
    assert!(images(&installation).await.is_empty(), "no image");
    assert_eq!(proxy.counts("CreateImage").0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_build_terminates_the_builder() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(BOOTING_CONSOLE);
    let (env, installation) = image_env(&proxy).await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_labbook"))
        .args(["image", "build"])
        .env_clear()
        .envs(&env.vars)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::helpers::eventually(
        Duration::from_secs(30),
        "the builder's console read",
        || async { (proxy.console_reads().0 > 0).then_some(()) },
    )
    .await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("terminated"),
        "{err}"
    );
    let launched = builders(&installation).await;
    assert_eq!(launched.len(), 1);
    assert!(all_gone(&launched), "the builder is terminated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_the_newest_and_deletes_the_others_snapshots() {
    let proxy = ThrottlingProxy::start().await;
    let (mut env, installation) = image_env(&proxy).await;
    // Five images of the installation, as builds would have made them, oldest first.
    let source = launch_tagged_builder(&installation).await;
    let ec2 = raw_ec2().await;
    let mut made = Vec::new();
    for day in 1..=5 {
        let name = format!("labbook-{installation}-2026120{day}T090000Z");
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Image)
            .tags(Tag::builder().key("labbook:managed").value("true").build())
            .tags(
                Tag::builder()
                    .key("labbook:installation")
                    .value(&installation)
                    .build(),
            )
            .tags(Tag::builder().key("labbook:version").value("0.1.0").build())
            .build();
        let out = ec2
            .create_image()
            .instance_id(&source)
            .name(name)
            .tag_specifications(tags)
            .send()
            .await
            .unwrap();
        made.push(out.image_id().unwrap().to_owned());
    }
    ec2.terminate_instances()
        .instance_ids(&source)
        .send()
        .await
        .unwrap();
    let snapshots = |id: &str| {
        let id = id.to_owned();
        let installation = installation.clone();
        async move {
            let all = images(&installation).await;
            snapshots_of(
                all.iter()
                    .find(|i| i.image_id() == Some(id.as_str()))
                    .unwrap(),
            )
        }
    };
    let mut snaps = Vec::new();
    for id in &made {
        let s = snapshots(id).await;
        assert!(!s.is_empty());
        snaps.push(s);
    }
    // The oldest is the one the machines launch from.
    env.vars.insert("LABBOOK_AMI_ID".into(), made[0].clone());

    let (code, _, err) = cli(&env, &["image", "prune", "--keep", "0"]);
    assert_eq!(code, Some(2), "{err}");

    let (code, out, err) = cli(&env, &["image", "prune", "--keep", "2", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(out.matches("would remove ").count(), 2, "{out}");
    assert!(out.contains(&made[1]) && out.contains(&made[2]), "{out}");
    assert!(out.contains(&format!("keeping {} ", made[0])), "{out}");
    assert_eq!(
        images(&installation).await.len(),
        5,
        "a dry run removes nothing"
    );

    let (code, out, err) = cli(&env, &["image", "prune", "--keep", "2"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("removed 2 image(s)"), "{out}");
    let mut left: Vec<String> = images(&installation)
        .await
        .iter()
        .map(|i| i.image_id().unwrap().to_owned())
        .collect();
    left.sort();
    let mut expected = vec![made[0].clone(), made[3].clone(), made[4].clone()];
    expected.sort();
    assert_eq!(left, expected, "the newest two and LABBOOK_AMI_ID's");
    for (i, image_snapshots) in snaps.iter().enumerate() {
        for s in image_snapshots {
            let removed = i == 1 || i == 2;
            assert_eq!(
                snapshot_exists(s).await,
                !removed,
                "snapshot {s} of image {i}"
            );
        }
    }

    let (code, out, _) = cli(&env, &["image", "list", "--json"]);
    assert_eq!(code, Some(0));
    let listed: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap()
        .iter()
        .map(|i| i["image_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed,
        vec![made[4].clone(), made[3].clone(), made[0].clone()],
        "newest first"
    );

    let (code, out, _) = cli(&env, &["image", "prune", "--keep", "2"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("nothing to remove"), "{out}");
}
