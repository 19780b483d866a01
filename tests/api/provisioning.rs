//! Scheduling, provisioning and teardown against the EC2 API emulator.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use labbook::crypto::admin_context;
use labbook::crypto::password_context;
use labbook::domain::{BookingRef, EmailKind, NotifyMessage, Password};
use labbook::ec2::LaunchRequest;
use labbook::startup::Worker;
use labbook::store::{bookings, schedule, slots};

use crate::helpers::{
    TestEnv, all_terminated, booking_at, booking_json, eventually, header, instances_for,
    publish_ref, state_of, unique_id, user_data_of,
};

const WAIT: Duration = Duration::from_secs(30);

/// Takes `notify` messages until one of `kind` arrives.
async fn wait_notify(env: &TestEnv, kind: EmailKind) -> NotifyMessage {
    eventually(WAIT, "a notify message", || async {
        env.take("notify", 10, Duration::from_millis(300))
            .await
            .into_iter()
            .map(|d| serde_json::from_slice::<NotifyMessage>(&d.data).unwrap())
            .find(|n| n.kind == kind)
    })
    .await
}

#[tokio::test]
async fn a_due_booking_gets_tagged_imdsv2_instances_with_hashed_user_data() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Provisioner])
        .await;
    let id = unique_id("prov");
    // Started an hour ago, ends in two: due now.
    env.publish_booking(&booking_json(&id, 3, -1)).await;
    let n = wait_notify(&env, EmailKind::InstanceDetails).await;
    assert_eq!(n.booking_id, id);

    let store = env.store().await;
    assert_eq!(
        bookings::find(&store.pool, &id)
            .await
            .unwrap()
            .unwrap()
            .state
            .as_str(),
        "provisioned"
    );
    let slots = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(slots.len(), 2, "3 users, 2 per instance");
    assert_eq!((slots[0].user_count, slots[1].user_count), (2, 1));
    let instances = instances_for(&id).await;
    assert_eq!(instances.len(), 2);
    let creds = bookings::credentials(&store.pool, &id).await.unwrap();
    for slot in &slots {
        let instance = instances
            .iter()
            .find(|i| i.instance_id() == slot.instance_id.as_deref())
            .unwrap();
        assert!(slot.address().is_some());
        let tags: HashSet<(String, String)> = instance
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect();
        assert!(tags.contains(&("labbook:booking-id".into(), id.clone())));
        assert!(tags.contains(&("labbook:slot".into(), slot.slot.to_string())));
        assert!(tags.contains(&("labbook:managed".into(), "true".into())));
        let metadata = instance.metadata_options().unwrap();
        assert_eq!(metadata.http_tokens().unwrap().as_str(), "required");

        let data = user_data_of(slot.instance_id.as_deref().unwrap()).await;
        assert!(data.starts_with("#cloud-config"));
        let admin_pw = env
            .key
            .decrypt(
                &slot.admin_password_encrypted,
                &admin_context(&id, slot.slot),
            )
            .unwrap();
        assert!(!data.contains(admin_pw.expose()));
        assert!(data.contains(&slot.admin_password_hash));
        assert!(admin_pw.verify(&slot.admin_password_hash));
        for c in &creds {
            let pw: Password = env
                .key
                .decrypt(&c.password_encrypted, &password_context(&id, &c.username))
                .unwrap();
            assert!(
                !data.contains(pw.expose()),
                "a plaintext password is in the user-data"
            );
            let on_this = slot.user_positions().contains(&c.position);
            assert_eq!(
                data.contains(&c.username),
                on_this,
                "{} on slot {}",
                c.username,
                slot.slot
            );
            if on_this {
                assert!(data.contains(&c.password_hash));
            }
        }
    }

    // The same provision-due again launches nothing.
    publish_ref(&env, "provision-due", &id).await;
    wait_notify(&env, EmailKind::InstanceDetails).await;
    assert_eq!(instances_for(&id).await.len(), 2);
    env.stop().await;
}

/// A 4-user booking, 3 days ahead, stored and scheduled; then an instance launched for `slot`
/// that nobody recorded, as a provisioner that died right after `RunInstances` leaves it (its
/// launch intent recorded, the instance not).
async fn scheduled_with_orphan(env: &mut TestEnv, prefix: &str, slot: i32) -> (String, String) {
    env.spawn(&[Worker::Credentials, Worker::Scheduler]).await;
    let id = unique_id(prefix);
    env.publish_booking(&booking_json(&id, 4, 72)).await;
    env.wait_state(&id, "scheduled").await;
    let request = LaunchRequest {
        booking_id: &id,
        slot,
        generation: 0,
        user_data: "#cloud-config\n{}",
        offering: &crate::helpers::default_offering(),
        offering_index: 0,
    };
    let store = env.store().await;
    labbook::ec2::intent::record(&store.pool, &id, slot, 0)
        .await
        .unwrap();
    let orphan = env
        .ec2()
        .await
        .launch(&request, "ami-03cf127a")
        .await
        .unwrap();
    (id, orphan)
}

#[tokio::test]
async fn a_crash_between_launch_and_record_launches_nothing_new() {
    let mut env = TestEnv::new().await;
    let (id, orphan) = scheduled_with_orphan(&mut env, "crash", 1).await;
    let store = env.store().await;

    env.spawn(&[Worker::Provisioner]).await;
    publish_ref(&env, "provision-due", &id).await;
    wait_notify(&env, EmailKind::InstanceDetails).await;
    let instances = instances_for(&id).await;
    assert_eq!(
        instances.len(),
        2,
        "slot 1's orphan was adopted, only slot 0 launched"
    );
    let slots = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(slots[1].instance_id.as_deref(), Some(orphan.as_str()));
    // The adopted machine is recorded as EC2 describes it, like a launched one.
    let (image, kind, subnet): (Option<String>, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT image_id, instance_type, subnet_id FROM machines WHERE instance_id = $1",
    )
    .bind(&orphan)
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!(image.as_deref(), Some("ami-03cf127a"));
    assert_eq!(kind.as_deref(), Some("t3.small"));
    assert!(
        subnet.is_some_and(|s| s.starts_with("subnet-")),
        "its subnet"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_future_booking_is_not_provisioned_early() {
    let mut env = TestEnv::with(&[("LABBOOK_PROVISION_LEAD_SECONDS", "900")]).await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Provisioner])
        .await;
    let id = unique_id("future");
    let at = Utc::now() + chrono::Duration::hours(2);
    env.publish_booking(&booking_at(&id, 2, at, 60)).await;
    let store = env.store().await;
    let entries = eventually(WAIT, "the schedule", || async {
        let e = schedule::for_booking(&store.pool, &id).await.unwrap();
        (e.len() == 2).then_some(e)
    })
    .await;
    let provision = entries
        .iter()
        .find(|e| e.action.as_str() == "provision")
        .unwrap();
    let teardown = entries
        .iter()
        .find(|e| e.action.as_str() == "teardown")
        .unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(&at.to_rfc3339())
        .unwrap()
        .with_timezone(&Utc);
    assert!(
        (provision.due_at - (at - chrono::Duration::seconds(900)))
            .num_milliseconds()
            .abs()
            < 1000
    );
    assert!(
        (teardown.due_at - (at + chrono::Duration::minutes(60)))
            .num_milliseconds()
            .abs()
            < 1000
    );
    // Nothing else happens: the workers stopped, everything waiting in the queues handled.
    env.stop().await;
    env.drain().await;
    assert!(instances_for(&id).await.is_empty());
    let provision = schedule::find(&store.pool, &id, schedule::Action::Provision)
        .await
        .unwrap()
        .unwrap();
    assert!(provision.published_at.is_none(), "not due yet");
    assert_eq!(
        bookings::find(&store.pool, &id)
            .await
            .unwrap()
            .unwrap()
            .state
            .as_str(),
        "scheduled"
    );
}

#[tokio::test]
async fn teardown_terminates_the_instances_when_the_booking_ends() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Provisioner])
        .await;
    let id = unique_id("teardown");
    // 15 minutes long, ending 8 seconds from now.
    let at = Utc::now() - chrono::Duration::minutes(15) + chrono::Duration::seconds(8);
    env.publish_booking(&booking_at(&id, 2, at, 15)).await;
    wait_notify(&env, EmailKind::InstanceDetails).await;
    assert_eq!(instances_for(&id).await.len(), 1);
    env.wait_state(&id, "ended").await;
    let instances = instances_for(&id).await;
    assert!(all_terminated(&instances));
    env.stop().await;
}

#[tokio::test]
async fn a_permanent_failure_terminates_partial_launches_and_notifies() {
    let mut env = TestEnv::new().await;
    // Slot 0 got launched; slot 1 cannot be (the subnet does not exist).
    let (id, _) = scheduled_with_orphan(&mut env, "fail", 0).await;
    let store = env.store().await;
    env.spawn_with(
        &[Worker::Provisioner],
        &[
            ("LABBOOK_SUBNET_ID", "subnet-doesnotexist"),
            ("LABBOOK_SECURITY_GROUP_IDS", ""),
        ],
    )
    .await;
    publish_ref(&env, "provision-due", &id).await;

    let n = wait_notify(&env, EmailKind::Failure).await;
    assert_eq!(n.booking_id, id);
    let dead = env.take("provision-due.dlq", 1, WAIT).await;
    let error = header(&dead[0], "x-labbook-error").unwrap();
    assert!(error.contains("InvalidSubnetID"), "{error}");
    assert_eq!(
        crate::helpers::attempts(&dead[0]),
        Some(1),
        "permanent: no retries"
    );
    let booking = bookings::find(&store.pool, &id).await.unwrap().unwrap();
    assert_eq!(booking.state.as_str(), "failed");
    let instances = instances_for(&id).await;
    assert_eq!(instances.len(), 1);
    assert!(all_terminated(&instances));
    env.stop().await;
}

#[tokio::test]
async fn two_scheduler_replicas_publish_each_due_item_once() {
    let mut env = TestEnv::new().await;
    let store = env.store().await;
    let n = 60;
    for i in 0..n {
        let id = format!("due-{i}");
        sqlx::query(
            "INSERT INTO bookings (booking_id, email, booking_time, number_of_users, duration_minutes)
             VALUES ($1, 'a@example.org', now(), 1, 60)",
        )
        .bind(&id)
        .execute(&store.pool)
        .await
        .unwrap();
        schedule::insert(&store.pool, &id, schedule::Action::Provision, Utc::now(), 0)
            .await
            .unwrap();
        schedule::insert(
            &store.pool,
            &id,
            schedule::Action::Teardown,
            Utc::now() + chrono::Duration::hours(1),
            0,
        )
        .await
        .unwrap();
    }
    env.spawn(&[Worker::Scheduler]).await;
    env.spawn(&[Worker::Scheduler]).await;
    eventually(WAIT, "every item published", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM schedule WHERE action = 'provision' AND published_at IS NULL",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        (left == 0).then_some(())
    })
    .await;
    env.stop().await;
    let msgs = env
        .take("provision-due", 2 * n, Duration::from_secs(3))
        .await;
    let ids: Vec<String> = msgs
        .iter()
        .map(|d| {
            serde_json::from_slice::<BookingRef>(&d.data)
                .unwrap()
                .booking_id
        })
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), n, "each due item published exactly once");
    assert_eq!(unique.len(), n);
    assert_eq!(env.depth("teardown-due").await, 0);
}

#[tokio::test]
async fn the_sweep_terminates_machines_of_bookings_that_are_over_and_only_those() {
    // An installation of its own: the sweep lists only its machines, however many the shared
    // emulator holds.
    let installation = format!("sweep-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut env = TestEnv::with(&[("LABBOOK_INSTALLATION", installation.as_str())]).await;
    let store = env.store().await;
    let over = unique_id("swept");
    let unknown = unique_id("not-ours");
    sqlx::query(
        "INSERT INTO bookings (booking_id, email, booking_time, number_of_users, duration_minutes, state)
         VALUES ($1, 'a@example.org', now() - interval '3 hours', 2, 60, 'ended')",
    )
    .bind(&over)
    .execute(&store.pool)
    .await
    .unwrap();
    let ec2 = env.ec2().await;
    for id in [&over, &unknown] {
        let request = LaunchRequest {
            booking_id: id,
            slot: 0,
            generation: 0,
            user_data: "#cloud-config\n{}",
            offering: &crate::helpers::default_offering(),
            offering_index: 0,
        };
        ec2.launch(&request, "ami-03cf127a").await.unwrap();
    }
    env.spawn_with(
        &[Worker::Provisioner],
        &[("LABBOOK_SWEEP_INTERVAL_SECONDS", "1")],
    )
    .await;
    eventually(WAIT, "the left-over machine terminated", || async {
        all_terminated(&instances_for(&over).await).then_some(())
    })
    .await;
    let theirs = instances_for(&unknown).await;
    assert_eq!(
        state_of(&theirs[0]),
        "running",
        "a booking this database does not know is left alone"
    );
    env.stop().await;
}

/// The installation tag of an instance as EC2 shows it.
fn installation_of(i: &aws_sdk_ec2::types::Instance) -> Option<String> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some("labbook:installation"))
        .and_then(|t| t.value())
        .map(str::to_owned)
}

#[tokio::test]
async fn installations_sharing_an_account_touch_only_their_own_machines() {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (staging, production) = (format!("staging-{suffix}"), format!("prod-{suffix}"));
    let a = TestEnv::with(&[("LABBOOK_INSTALLATION", &staging)]).await;
    let b = TestEnv::with(&[("LABBOOK_INSTALLATION", &production)]).await;
    // The same booking id in both: over in staging, running in production.
    let id = unique_id("shared");
    for (env, state, ends) in [(&a, "ended", "-1 hour"), (&b, "provisioned", "2 hours")] {
        sqlx::query(
            "INSERT INTO bookings (booking_id, email, booking_time, number_of_users, duration_minutes, state)
             VALUES ($1, 'a@example.org', now() + $3::interval - interval '60 minutes', 2, 60, $2)",
        )
        .bind(&id)
        .bind(state)
        .bind(ends)
        .execute(&env.store().await.pool)
        .await
        .unwrap();
        let request = LaunchRequest {
            booking_id: &id,
            slot: 0,
            generation: 0,
            user_data: "#cloud-config\n{}",
            offering: &crate::helpers::default_offering(),
            offering_index: 0,
        };
        env.ec2()
            .await
            .launch(&request, "ami-03cf127a")
            .await
            .unwrap();
    }
    let both = instances_for(&id).await;
    assert_eq!(both.len(), 2);
    let tags: HashSet<Option<String>> = both.iter().map(installation_of).collect();
    assert_eq!(
        tags,
        HashSet::from([Some(staging.clone()), Some(production.clone())])
    );
    for (env, name) in [(&a, &staging), (&b, &production)] {
        let found = env.ec2().await.find_for_booking(&id).await.unwrap();
        assert_eq!(found.len(), 1, "{name} finds only its own machine");
        assert_eq!(found[0].installation.as_deref(), Some(name.as_str()));
    }

    // Staging's sweep, twice: its own machine goes, production's stays.
    let settings = a.settings();
    let sweeper = labbook::stages::provisioner::Provisioner::new(
        a.store().await,
        a.ec2().await,
        a.key.clone(),
        settings.ec2.clone(),
        "ami-03cf127a".into(),
    );
    for _ in 0..2 {
        sweeper.sweep(chrono::Duration::minutes(5)).await.unwrap();
    }
    let instances = instances_for(&id).await;
    let state = |name: &str| {
        let i = instances
            .iter()
            .find(|i| installation_of(i).as_deref() == Some(name))
            .unwrap();
        state_of(i)
    };
    assert!(matches!(
        state(&staging).as_str(),
        "terminated" | "shutting-down"
    ));
    assert_eq!(
        state(&production),
        "running",
        "production's machine is untouched"
    );
}

/// labbook's security group of `installation` as EC2 shows it.
async fn security_group(name: &str) -> aws_sdk_ec2::types::SecurityGroup {
    let out = crate::helpers::raw_ec2()
        .await
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values(name)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(out.security_groups().len(), 1, "one group named {name}");
    out.security_groups()[0].clone()
}

fn opens(group: &aws_sdk_ec2::types::SecurityGroup, port: i32, cidr: &str) -> bool {
    group.ip_permissions().iter().any(|p| {
        p.from_port() == Some(port) && p.ip_ranges().iter().any(|r| r.cidr_ip() == Some(cidr))
    })
}

/// A test environment of an installation of its own (so a group of its own) allowing `cidrs`.
async fn group_env(cidrs: &str) -> (TestEnv, String) {
    let installation = format!("sg-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let env = TestEnv::with(&[
        ("LABBOOK_INSTALLATION", installation.as_str()),
        ("LABBOOK_ALLOWED_CIDRS", cidrs),
    ])
    .await;
    (env, installation)
}

/// Slot 0 of `booking_id`, with empty user-data.
fn bare_launch<'a>(booking_id: &'a str, offering: &'a labbook::ec2::Offering) -> LaunchRequest<'a> {
    LaunchRequest {
        booking_id,
        slot: 0,
        generation: 0,
        user_data: "#cloud-config\n{}",
        offering,
        offering_index: 0,
    }
}

/// Someone closes `port` to `cidr` on the group.
async fn revoke(group: &aws_sdk_ec2::types::SecurityGroup, port: i32, cidr: &str) {
    crate::helpers::raw_ec2()
        .await
        .revoke_security_group_ingress()
        .group_id(group.group_id().unwrap())
        .ip_protocol("tcp")
        .from_port(port)
        .to_port(port)
        .cidr_ip(cidr)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn labbooks_security_group_is_tagged_in_the_default_vpc_and_its_ingress_repaired() {
    let cidr = "198.51.100.0/24";
    let (env, installation) = group_env(cidr).await;
    let (booking, offering) = (unique_id("sg"), crate::helpers::default_offering());
    let request = bare_launch(&booking, &offering);
    let ec2 = env.ec2().await;
    let name = ec2.group_name();
    assert_eq!(name, format!("labbook-lab-{installation}"));
    ec2.launch(&request, "ami-03cf127a").await.unwrap();

    let group = security_group(&name).await;
    let tag = |key: &str| {
        group
            .tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    assert_eq!(tag("labbook:managed").as_deref(), Some("true"));
    assert_eq!(tag("labbook:installation"), Some(installation.clone()));
    let vpcs = crate::helpers::raw_ec2()
        .await
        .describe_vpcs()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("isDefault")
                .values("true")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        group.vpc_id(),
        vpcs.vpcs()[0].vpc_id(),
        "in the default VPC"
    );
    for port in [22, 80, 443] {
        assert!(opens(&group, port, cidr), "port {port} open to {cidr}");
    }
    // Only the allowed range: a machine that got no certificate serves its login page on 80.
    for port in [22, 80, 443] {
        assert!(
            !opens(&group, port, ANYWHERE),
            "port {port} closed to the internet"
        );
    }

    // Someone closes HTTP; the next provisioner process opens it again before using the group.
    revoke(&group, 80, cidr).await;
    assert!(!opens(&security_group(&name).await, 80, cidr));
    env.ec2()
        .await
        .launch(&request, "ami-03cf127a")
        .await
        .unwrap();
    let repaired = security_group(&name).await;
    assert_eq!(
        repaired.group_id(),
        group.group_id(),
        "the same group, reused"
    );
    assert!(opens(&repaired, 80, cidr), "HTTP open again");
}

const ANYWHERE: &str = "0.0.0.0/0";

#[tokio::test]
async fn a_range_named_twice_opens_each_port_once_and_every_lost_rule_is_repaired() {
    let (cidr, other) = ("198.51.100.0/24", "203.0.113.0/24");
    let (env, _) = group_env(&format!("{cidr},{other},{cidr}")).await;
    let ec2 = env.ec2().await;
    let rules = ec2.ingress();
    assert_eq!(rules.len(), 6, "{rules:?}");
    let (booking, offering) = (unique_id("sg-twice"), crate::helpers::default_offering());
    let request = bare_launch(&booking, &offering);
    ec2.launch(&request, "ami-03cf127a").await.unwrap();
    let name = ec2.group_name();
    let group = security_group(&name).await;
    for (port, range) in &rules {
        assert!(opens(&group, *port, range), "port {port} open to {range}");
    }
    // Two rules of one range gone: the next process opens both (one call each, so a rule that
    // another replica opened meanwhile would not keep the other closed).
    for port in [80, 443] {
        revoke(&group, port, other).await;
    }
    env.ec2()
        .await
        .launch(&request, "ami-03cf127a")
        .await
        .unwrap();
    let repaired = security_group(&name).await;
    assert!(opens(&repaired, 80, other) && opens(&repaired, 443, other));
}

#[tokio::test]
async fn a_machine_taken_back_before_it_ran_is_replaced() {
    // A booking planned and launched, whose machine EC2 then terminated (no capacity, a volume
    // limit) before it ran.
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler]).await;
    let id = unique_id("replaced");
    env.publish_booking(&booking_json(&id, 2, 72)).await;
    env.wait_state(&id, "scheduled").await;
    env.stop().await;
    let store = env.store().await;
    let admin = Password::generate();
    let plan = [slots::NewSlot {
        slot: 0,
        first_user: 0,
        user_count: 2,
        admin_username: "labadmin".into(),
        admin_password_encrypted: env.key.encrypt(&admin, &admin_context(&id, 0)),
        admin_password_hash: admin.sha512_crypt(),
    }];
    slots::insert_plan(&store.pool, &id, &plan).await.unwrap();
    let request = LaunchRequest {
        booking_id: &id,
        slot: 0,
        generation: 0,
        user_data: "#cloud-config\n{}",
        offering: &crate::helpers::default_offering(),
        offering_index: 0,
    };
    let lost = env
        .ec2()
        .await
        .launch(&request, "ami-03cf127a")
        .await
        .unwrap();
    slots::record_instance(&store.pool, &id, (0, 0), &lost, Default::default())
        .await
        .unwrap();
    crate::helpers::raw_ec2()
        .await
        .terminate_instances()
        .instance_ids(&lost)
        .send()
        .await
        .unwrap();

    env.spawn(&[Worker::Provisioner]).await;
    publish_ref(&env, "provision-due", &id).await;
    env.wait_state(&id, "provisioned").await;
    let slot = &slots::for_booking(&store.pool, &id).await.unwrap()[0];
    assert_ne!(
        slot.instance_id.as_deref(),
        Some(lost.as_str()),
        "a new machine"
    );
    assert_eq!(slot.generation, 1, "launched with a new ClientToken");
    assert_eq!(env.depth("provision-due.dlq").await, 0);
    let running: Vec<_> = instances_for(&id)
        .await
        .into_iter()
        .filter(|i| state_of(i) == "running")
        .collect();
    assert_eq!(running.len(), 1);
    env.stop().await;
}

#[tokio::test]
async fn a_launch_whose_answer_was_lost_is_found_and_terminated_when_the_booking_moves() {
    // EC2 launches the machine but labbook never learns of it (the answer is lost on every
    // try); then the booking moves to another day before a retry finds it.
    let proxy = crate::throttling::ThrottlingProxy::start().await;
    proxy.lose_next_run_instances_answers(3);
    let mut env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_RETRY_DELAYS_MS", "60000"),
    ])
    .await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("lost-answer");
    let now = chrono::Utc::now();
    let mut booking: serde_json::Value =
        serde_json::from_str(&crate::helpers::booking_at(&id, 2, now, 120)).unwrap();
    env.publish_booking(&booking.to_string()).await;
    let lost = eventually(Duration::from_secs(30), "the lost launches", || async {
        let launched = instances_for(&id).await;
        (launched.len() == 3).then_some(launched)
    })
    .await;
    assert!(lost.iter().all(|i| state_of(i) != "terminated"));
    let store = env.store().await;
    let slot = &labbook::store::slots::for_booking(&store.pool, &id)
        .await
        .unwrap()[0];
    assert!(slot.instance_id.is_none(), "labbook never saw them");
    // The move: provisioning starts again in two days, at generation 1.
    booking["revision"] = 1.into();
    booking["booking_time"] = (now + chrono::Duration::days(2)).to_rfc3339().into();
    env.publish_booking(&booking.to_string()).await;
    eventually(
        Duration::from_secs(30),
        "the lost machines terminated",
        || async { all_terminated(&instances_for(&id).await).then_some(()) },
    )
    .await;
    env.wait_state(&id, "scheduled").await;
    let slot = &labbook::store::slots::for_booking(&store.pool, &id)
        .await
        .unwrap()[0];
    assert_eq!((slot.generation, slot.instance_id.as_deref()), (1, None));
    env.stop().await;
}
