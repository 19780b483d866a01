//! `labbook console`: the HTTP API and the pages against the real broker, database, EC2
//! emulator and SMTP sink, a failed booking taken through the real pipeline. Every answer is
//! scanned for the booking's passwords.

use std::time::Duration;

use labbook::config::Settings;
use labbook::console::Console;
use labbook::startup::Worker;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

use crate::helpers::{TestEnv, booking_json, unique_id};

const TOKEN: &str = "console-test-token-0123456789";

/// A console serving `env`, in this process.
pub(crate) struct Served {
    base: String,
    http: reqwest::Client,
    _task: tokio::task::JoinHandle<()>,
}

impl Served {
    pub(crate) async fn start(env: &TestEnv) -> Self {
        let mut vars = env.vars.clone();
        vars.insert("LABBOOK_CONSOLE_TOKEN".into(), TOKEN.into());
        let settings = Settings::from_map(&vars).unwrap();
        let console = Console::build(&settings, Some("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let base = format!("http://{}", console.local_addr());
        let task = tokio::spawn(console.run_until_stopped(std::future::pending()));
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self {
            base,
            http,
            _task: task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) async fn api(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.url(path))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    async fn api_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }
}

/// Every password of a booking (trainees' and admins'), decrypted with the test's key.
async fn passwords_of(env: &TestEnv, id: &str) -> Vec<String> {
    use labbook::crypto::{admin_context, password_context};
    let pool = env.store().await.pool;
    let mut out = Vec::new();
    for c in labbook::store::bookings::credentials(&pool, id)
        .await
        .unwrap()
    {
        let ctx = password_context(id, &c.username);
        out.push(
            env.key
                .decrypt(&c.password_encrypted, &ctx)
                .unwrap()
                .expose()
                .to_owned(),
        );
    }
    for s in labbook::store::slots::for_booking(&pool, id).await.unwrap() {
        let ctx = admin_context(id, s.slot);
        out.push(
            env.key
                .decrypt(&s.admin_password_encrypted, &ctx)
                .unwrap()
                .expose()
                .to_owned(),
        );
    }
    out
}

fn assert_no_password(answer: &str, passwords: &[String]) {
    assert!(!passwords.is_empty());
    for p in passwords {
        assert!(
            !answer.contains(p.as_str()),
            "a password is in an answer: {answer}"
        );
    }
}

/// A booking that failed for real: the provisioner cannot launch into a subnet that does not
/// exist. Returns its id once it is `failed` with its `provision-due` dead-lettered; then
/// runs every worker again with a launchable configuration (the cause fixed).
async fn failed_booking(env: &mut TestEnv, served: &Served) -> String {
    let bad_subnet = [
        ("LABBOOK_SUBNET_ID", "subnet-doesnotexist"),
        ("LABBOOK_SECURITY_GROUP_IDS", ""),
    ];
    env.spawn_with(&Worker::ALL, &bad_subnet).await;
    let id = unique_id("console");
    let body: Value = serde_json::from_str(&booking_json(&id, 3, 0)).unwrap();
    let (status, accepted) = served.api_post("/api/bookings", body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["routing_key"], "booking-created");
    env.wait_state(&id, "failed").await;
    crate::helpers::eventually(Duration::from_secs(20), "the dead letter", || async {
        (env.depth("provision-due.dlq").await == 1).then_some(())
    })
    .await;
    env.stop().await;
    env.spawn(&Worker::ALL).await;
    id
}

/// The bookings list and the booking's story, as the API tells them; returns the answers.
async fn check_failed_story(served: &Served, id: &str) -> Vec<String> {
    let (status, list) = served.api("/api/bookings?state=failed").await;
    assert_eq!(status, StatusCode::OK);
    let row = &list["bookings"][0];
    assert_eq!(row["booking_id"].as_str(), Some(id));
    // The list reads no dead-letter queue: the booking's own page shows its dead letters.
    assert!(row.get("dead_letters").is_none(), "{row}");
    let reason = row["failure_reason"].as_str().unwrap();
    assert!(reason.contains("InvalidSubnetID"), "{row}");
    let (_, none) = served.api("/api/bookings?state=provisioned").await;
    assert_eq!(none["total"], 0);
    let (_, found) = served.api(&format!("/api/bookings?q={}", &id[3..])).await;
    assert_eq!(found["total"], 1);

    let (status, detail) = served.api(&format!("/api/bookings/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let timeline = detail["timeline"].as_array().unwrap();
    let events: Vec<&str> = timeline
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let wanted = [
        "received",
        "credentials",
        "scheduled",
        "provisioning",
        "email_sent",
    ];
    for event in wanted.iter().chain(&["dead_letter", "failed"]) {
        assert!(events.contains(event), "{event} missing from {events:?}");
    }
    assert_eq!(detail["usernames"].as_array().unwrap().len(), 3);
    assert_eq!(detail["dead_letters"].as_array().unwrap().len(), 1);
    vec![list.to_string(), detail.to_string()]
}

/// Finds the booking's dead letter by booking and by error text, shows it, replays it after a
/// dry run that moves nothing; returns the answers.
async fn replay_through_the_api(served: &Served, env: &TestEnv, id: &str) -> Vec<String> {
    let path = "/api/dead-letters/provision-due";
    let (_, letters) = served.api(&format!("{path}?booking_id={id}")).await;
    assert_eq!(letters["dead_letters"].as_array().unwrap().len(), 1);
    let letter_id = letters["dead_letters"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, by_error) = served.api(&format!("{path}?error=invalidsubnet")).await;
    assert_eq!(by_error["dead_letters"][0]["id"], letter_id.as_str());
    let (_, other) = served.api(&format!("{path}?error=no-such-error")).await;
    let shown = other["dead_letters"].as_array().unwrap().len();
    assert_eq!((other["total"].as_u64(), shown), (Some(1), 0));
    let (status, one) = served.api(&format!("{path}/{letter_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(one["body"].as_str().unwrap().contains(id));

    let replay = format!("{path}/replay");
    let dry_run = json!({"ids": [letter_id], "dry_run": true});
    let (status, dry) = served.api_post(&replay, dry_run).await;
    assert_eq!(
        (status, dry["count"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{dry}"
    );
    let left = env.depth("provision-due.dlq").await;
    assert_eq!(left, 1, "a dry run moves nothing");
    let (status, done) = served.api_post(&replay, json!({"ids": [letter_id]})).await;
    let moved = (status, done["replayed"].as_u64(), done["left"].as_u64());
    assert_eq!(moved, (StatusCode::OK, Some(1), Some(0)), "{done}");
    vec![one.to_string(), dry.to_string(), done.to_string()]
}

#[tokio::test]
async fn the_api_tells_a_failed_booking_and_replays_its_dead_letter_after_a_dry_run() {
    let mut env = TestEnv::new().await;
    let served = Served::start(&env).await;
    let id = failed_booking(&mut env, &served).await;
    let mut answers = check_failed_story(&served, &id).await;
    answers.extend(replay_through_the_api(&served, &env, &id).await);

    env.wait_state(&id, "provisioned").await;
    let (_, detail) = served.api(&format!("/api/bookings/{id}")).await;
    assert_eq!(detail["booking"]["state"], "provisioned");
    assert_eq!(detail["dead_letters"].as_array().unwrap().len(), 0);
    let url = detail["machines"][0]["url"].as_str().unwrap();
    assert!(url.starts_with("http://"), "{detail}");
    answers.push(detail.to_string());
    // Each machine: the image it booted from and how long it took to be ready, from its
    // `machines` row.
    let ami = env.vars["LABBOOK_AMI_ID"].clone();
    for m in detail["machines"].as_array().unwrap() {
        assert_eq!(m["image_id"], ami.as_str(), "{m}");
        assert_eq!(m["boot"], "ready", "{m}");
        assert!(
            m["ready_at"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{m}"
        );
        assert!(m["boot_seconds"].as_i64().is_some_and(|s| s >= 0), "{m}");
    }
    // A machine the boot watch has not seen ready yet is booting, with no boot time.
    let pool = env.store().await.pool;
    sqlx::query("UPDATE machines SET ready_at = NULL, boot_seconds = NULL WHERE booking_id = $1")
        .bind(&id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE slots SET ready_at = NULL WHERE booking_id = $1 AND slot = 0")
        .bind(&id)
        .execute(&pool)
        .await
        .unwrap();
    let (_, booting) = served.api(&format!("/api/bookings/{id}")).await;
    let m = &booting["machines"][0];
    assert_eq!(
        (
            &m["boot"],
            &m["ready_at"],
            &m["boot_seconds"],
            &m["image_id"]
        ),
        (&json!("booting"), &Value::Null, &Value::Null, &json!(ami)),
        "{booting}"
    );
    let passwords = passwords_of(&env, &id).await;
    for answer in &answers {
        assert_no_password(answer, &passwords);
    }
    env.stop().await;
}

/// The login page's CSRF cookie and token, then a logged-in cookie header.
async fn log_in(served: &Served) -> String {
    let r = served.http.get(served.url("/login")).send().await.unwrap();
    let csrf_cookie = cookie(&r, "labbook_csrf");
    let csrf = field(&r.text().await.unwrap(), "csrf").remove(0);
    let wrong = served
        .http
        .post(served.url("/login"))
        .header(COOKIE, &csrf_cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("token", "not-the-token-at-all"),
            ("next", "/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let nameless = served
        .http
        .post(served.url("/login"))
        .header(COOKIE, &csrf_cookie)
        .form(&[("csrf", csrf.as_str()), ("token", TOKEN), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        nameless.status(),
        StatusCode::UNAUTHORIZED,
        "a login says who"
    );
    let ok = served
        .http
        .post(served.url("/login"))
        .header(COOKIE, &csrf_cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("token", TOKEN),
            ("name", "Grace Ops"),
            ("next", "/dead-letters"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(ok.headers()[LOCATION], "/dead-letters");
    let set = ok.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    format!("{csrf_cookie}; {}", cookie(&ok, "labbook_session"))
}

fn cookie(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie"))
        .to_owned()
}

/// The values of the hidden inputs named `name` in a page.
fn field(html: &str, name: &str) -> Vec<String> {
    let marker = format!("name=\"{name}\" value=\"");
    html.match_indices(&marker)
        .map(|(i, _)| {
            html[i + marker.len()..]
                .split('"')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn the_pages_show_the_story_and_replay_only_with_a_csrf_token() {
    let mut env = TestEnv::new().await;
    let served = Served::start(&env).await;
    let id = failed_booking(&mut env, &served).await;
    let cookies = log_in(&served).await;
    let page = |path: String| {
        let req = served.http.get(served.url(&path)).header(COOKIE, &cookies);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            r.text().await.unwrap()
        }
    };
    let mut pages = vec![page("/bookings?state=failed".into()).await];
    assert!(pages[0].contains(&id));
    pages.push(page(format!("/bookings/{id}")).await);
    assert!(pages[1].contains("Booking failed") && pages[1].contains("InvalidSubnetID"));
    pages.push(page("/dead-letters".into()).await);
    pages.push(page("/health".into()).await);
    assert!(pages[3].contains("labbook-provisioner"));
    let queue = page(format!("/dead-letters/provision-due.dlq?booking_id={id}")).await;
    let letter_id = field(&queue, "id").remove(0);
    let dry = page(format!(
        "/dead-letters/provision-due.dlq/replay?id={letter_id}"
    ))
    .await;
    assert!(dry.contains("would go back to"), "{dry}");
    assert_eq!(field(&dry, "id"), std::slice::from_ref(&letter_id));
    assert_eq!(env.depth("provision-due.dlq").await, 1);

    let post = |form: Vec<(&'static str, String)>| {
        let req = served
            .http
            .post(served.url("/dead-letters/provision-due.dlq/replay"));
        req.header(COOKIE, &cookies).form(&form).send()
    };
    let without = post(vec![("id", letter_id.clone())]).await.unwrap();
    assert_eq!(without.status(), StatusCode::FORBIDDEN);
    let forged = post(vec![("id", letter_id.clone()), ("csrf", "0".repeat(64))])
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        env.depth("provision-due.dlq").await,
        1,
        "refused POSTs move nothing"
    );
    let csrf = field(&dry, "csrf").remove(0);
    let done = post(vec![("id", letter_id), ("csrf", csrf)]).await.unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    assert!(
        done.text()
            .await
            .unwrap()
            .contains("Replayed 1 dead letter(s) to provision-due")
    );
    env.wait_state(&id, "provisioned").await;
    pages.push(page(format!("/bookings/{id}")).await);
    assert!(pages[4].contains("Machine #0 launched"));
    // Each machine's image and boot time.
    let ami = format!("<td class=\"mono\">{}</td>", env.vars["LABBOOK_AMI_ID"]);
    assert!(pages[4].contains(&ami), "{}", pages[4]);
    assert!(
        pages[4].contains("<span class=\"badge ok\">ready</span> in "),
        "{}",
        pages[4]
    );
    let passwords = passwords_of(&env, &id).await;
    for p in &pages {
        assert_no_password(p, &passwords);
    }
    env.stop().await;
}

#[tokio::test]
async fn nothing_answers_without_the_token() {
    let env = TestEnv::new().await;
    let served = Served::start(&env).await;
    for path in [
        "/api/bookings",
        "/api/bookings/x",
        "/api/dead-letters",
        "/api/health",
        "/api/openapi.json",
    ] {
        for auth in [None, Some("Bearer wrong-token-wrong-token"), Some(TOKEN)] {
            let mut req = served.http.get(served.url(path));
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} with {auth:?}");
            assert!(r.headers().contains_key("www-authenticate"));
        }
    }
    for path in [
        "/bookings",
        "/bookings/x",
        "/dead-letters",
        "/dead-letters/notify.dlq",
        "/health",
        "/nowhere",
    ] {
        let r = served.http.get(served.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert!(
            r.headers()[LOCATION]
                .to_str()
                .unwrap()
                .starts_with("/login?next=")
        );
    }
    let forged = format!("labbook_session=9999999999.00.{}", "0".repeat(64));
    let r = served
        .http
        .get(served.url("/bookings"))
        .header(COOKIE, forged)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "a forged session is no session"
    );
    let r = served
        .http
        .post(served.url("/dead-letters/notify.dlq/purge"))
        .form(&[("id", "0123456789abcdef")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = served.api("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn post_bookings_validates_as_the_contract_says_and_publishes_with_a_confirm() {
    let env = TestEnv::new().await;
    let served = Served::start(&env).await;
    let send = |body: &'static str, content_type: &'static str| {
        let req = served
            .http
            .post(served.url("/api/bookings"))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"));
        req.header("content-type", content_type).body(body).send()
    };
    let r = send("not json", "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = send(r#"{"booking_id":"x"}"#, "text/plain").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = send(r#"{"booking_id":"x","email":"a@example.org","booking_time":"2020-01-01T09:00:00Z","number_of_users":2}"#, "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let reasons: Value = r.json().await.unwrap();
    assert!(
        reasons["reasons"][0].as_str().unwrap().contains("ended"),
        "{reasons}"
    );
    let r = send(r#"{"booking_id":"x","email":"a@example.org","booking_time":"2030-01-01T09:00:00Z","number_of_users":3.0}"#, "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        env.depth("booking-created").await,
        0,
        "nothing invalid is published"
    );

    let id = unique_id("api");
    let body: Value = serde_json::from_str(&booking_json(&id, 2, 48)).unwrap();
    let (status, accepted) = served.api_post("/api/bookings", body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(accepted["status"], format!("/api/bookings/{id}"));
    let got = env.take("booking-created", 1, Duration::from_secs(5)).await;
    let published: Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(published, body);
    assert_eq!(got[0].properties.delivery_mode(), &Some(2));
}

#[tokio::test]
async fn listing_dead_letters_through_the_console_loses_and_reorders_nothing() {
    let env = TestEnv::new().await;
    let served = Served::start(&env).await;
    let props = lapin::BasicProperties::default().with_content_type("application/json".into());
    for i in 0..5 {
        let body = format!(r#"{{"booking_id":"dl-{i}","email":"bad"}}"#);
        env.publish_raw("booking-created", body.as_bytes(), props.clone())
            .await;
    }
    env.drain().await;
    let ids = |v: &Value| -> Vec<String> {
        v["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["booking_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, first) = served.api("/api/dead-letters/booking-created").await;
    assert_eq!(ids(&first), ["dl-0", "dl-1", "dl-2", "dl-3", "dl-4"]);
    for _ in 0..12 {
        let (_, again) = served.api("/api/dead-letters/booking-created.dlq").await;
        assert_eq!(ids(&again), ids(&first));
    }
    let (status, refused) = served
        .api_post(
            "/api/dead-letters/booking-created/purge",
            json!({"booking_id": "dl-1"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a purge needs confirm: {refused}"
    );
    let (_, purged) = served
        .api_post(
            "/api/dead-letters/booking-created/purge",
            json!({"booking_id": "dl-1", "confirm": true}),
        )
        .await;
    assert_eq!(purged["purged"], 1);
    let (_, after) = served.api("/api/dead-letters/booking-created").await;
    assert_eq!(ids(&after), ["dl-0", "dl-2", "dl-3", "dl-4"]);
    assert_eq!(env.depth("booking-created.dlq").await, 4);
}

#[test]
fn the_console_refuses_to_start_without_a_long_token() {
    for token in [None, Some("short")] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_labbook"));
        cmd.args(["console", "--listen", "127.0.0.1:0"])
            .env_remove("LABBOOK_CONSOLE_TOKEN")
            .env_remove("LABBOOK_CONFIG");
        if let Some(t) = token {
            cmd.env("LABBOOK_CONSOLE_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("LABBOOK_CONSOLE_TOKEN"), "{err}");
    }
}

impl Served {
    /// A page of the console, as a logged-in operator sees it.
    pub(crate) async fn page(&self, path: &str) -> String {
        let session = log_in(self).await;
        let r = self
            .http
            .get(self.url(path))
            .header(COOKIE, session)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        r.text().await.unwrap()
    }

    /// A POST to the API as the operator `who` (an ingress's `X-Forwarded-User`).
    async fn act(&self, path: &str, who: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header("x-forwarded-user", who)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }
}

/// The booking's instance details emails in the SMTP sink.
async fn instance_emails(trainer: &str, id: &str) -> Vec<Value> {
    crate::helpers::emails_to(trainer)
        .await
        .into_iter()
        .filter(|e| {
            let text = e["text"].as_str().unwrap_or("");
            text.contains(&format!("Booking ID: {id}"))
                && e["subject"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Access Information")
        })
        .collect()
}

#[tokio::test]
async fn a_resend_from_the_console_is_one_more_copy_sent_exactly_once() {
    let mut env = TestEnv::new().await;
    let served = Served::start(&env).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("resend");
    let trainer = format!("{id}@example.org");
    let at = chrono::Utc::now();
    env.publish_booking(&crate::helpers::booking_for(&id, &trainer, 2, at, 60))
        .await;
    env.wait_state(&id, "provisioned").await;
    crate::helpers::eventually(
        Duration::from_secs(20),
        "the instance details email",
        || async { (instance_emails(&trainer, &id).await.len() == 1).then_some(()) },
    )
    .await;
    env.stop().await;

    let path = format!("/api/bookings/{id}/resend-instance-details");
    let (status, dry) = served.act(&path, "alice", json!({"dry_run": true})).await;
    assert_eq!(
        (status, dry["dry_run"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{dry}"
    );
    assert_eq!(env.depth("notify").await, 0, "a dry run publishes nothing");
    for copy in 1..=2 {
        let (status, done) = served.act(&path, "alice", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{done}");
        let said = done["what_happens"].as_str().unwrap();
        assert!(said.contains(&format!("copy {copy}")), "{said}");
    }
    // Each resend is its own message; a copy delivered twice is still sent once.
    let resend = labbook::domain::NotifyMessage::resend(
        &id,
        labbook::domain::EmailKind::InstanceDetails,
        0,
        1,
    );
    env.publish_raw(
        "notify",
        &resend.body,
        labbook::broker::json_properties(&resend.message_id),
    )
    .await;
    assert_eq!(env.depth("notify").await, 3);
    env.drain().await;
    let emails = instance_emails(&trainer, &id).await;
    assert_eq!(emails.len(), 3, "the original and two copies, each once");
    let ids: std::collections::BTreeSet<&str> = emails
        .iter()
        .map(|e| e["headers"]["message-id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        3,
        "every copy has a Message-ID of its own: {ids:?}"
    );
    assert!(ids.iter().any(|m| m.contains(".copy2@")), "{ids:?}");

    let (_, detail) = served.api(&format!("/api/bookings/{id}")).await;
    let resends = detail["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["title"] == "Instance details email resent by alice")
        .count();
    assert_eq!(resends, 2, "{detail}");
    let copies: Vec<i64> = detail["emails"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "instance_details")
        .map(|e| e["copy"].as_i64().unwrap())
        .collect();
    assert_eq!(copies.len(), 3, "{detail}");
    env.stop().await;
}

#[tokio::test]
async fn the_console_changes_and_cancels_a_booking_as_its_next_revision_and_says_who() {
    let mut env = TestEnv::new().await;
    let served = Served::start(&env).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("acts");
    env.publish_booking(&booking_json(&id, 2, 0)).await;
    env.wait_state(&id, "provisioned").await;

    let (status, _) = served
        .act("/api/bookings/nobody-here/cancel", "bob", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let duration = format!("/api/bookings/{id}/duration");
    let (status, bad) = served
        .act(&duration, "bob", json!({"duration_minutes": 5}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{bad}");
    let (status, dry) = served
        .act(
            &duration,
            "bob",
            json!({"duration_minutes": 240, "dry_run": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert!(
        dry["what_happens"]
            .as_str()
            .unwrap()
            .contains("240 minutes instead of 180"),
        "{dry}"
    );
    let (status, longer) = served
        .act(&duration, "bob", json!({"duration_minutes": 240}))
        .await;
    assert_eq!(
        (status, longer["revision"].as_i64()),
        (StatusCode::OK, Some(1)),
        "{longer}"
    );
    crate::helpers::eventually(Duration::from_secs(20), "the new end stored", || async {
        let (_, d) = served.api(&format!("/api/bookings/{id}")).await;
        (d["booking"]["duration_minutes"] == 240).then_some(())
    })
    .await;

    let cancel = format!("/api/bookings/{id}/cancel");
    let (status, done) = served.act(&cancel, "carol", json!({})).await;
    assert_eq!(
        (status, done["revision"].as_i64()),
        (StatusCode::OK, Some(2)),
        "{done}"
    );
    env.wait_state(&id, "cancelled").await;
    crate::helpers::eventually(
        Duration::from_secs(60),
        "the machines terminated",
        || async {
            let found = crate::helpers::instances_for(&id).await;
            (!found.is_empty() && crate::helpers::all_terminated(&found)).then_some(())
        },
    )
    .await;
    let (status, again) = served.act(&cancel, "carol", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");

    let (_, detail) = served.api(&format!("/api/bookings/{id}")).await;
    let titles: Vec<&str> = detail["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["title"].as_str().unwrap())
        .collect();
    let told = |want: &str| titles.iter().filter(|t| **t == want).count();
    assert_eq!(
        told("Change accepted (revision 1), published by bob from the console"),
        1,
        "{titles:?}"
    );
    assert_eq!(
        told("Cancelled (revision 2), published by carol from the console"),
        1,
        "{titles:?}"
    );
    assert!(
        !titles
            .iter()
            .any(|t| t.starts_with("Cancellation published")),
        "told once: {titles:?}"
    );
    env.stop().await;
}
