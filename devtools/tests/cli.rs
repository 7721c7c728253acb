//! The `roomcast` binary's plugin command, run as a user runs it, on components built from this
//! workspace (`scripts/test` builds them for wasm32-wasip2 first).

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn wasm(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let path = target.join(format!("wasm32-wasip2/release/{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/test (it builds the components)", path.display());
    path
}

fn plugin_test(component: &str, event: &str) -> (bool, String, String) {
    plugin_test_with(component, &root().join(event))
}

fn plugin_test_with(component: &str, event: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["plugin", "test"])
        .arg(wasm(component))
        .arg("--event")
        .arg(event)
        .output()
        .expect("run roomcast");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plugin_test_prints_the_verdict_fuel_time_and_log() {
    let (ok, stdout, stderr) = plugin_test("roomcast_plugin_moderation", "plugins/events/spam.json");
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#"on-message     Verdict::Reject("the word \"spam\" is not allowed here")"#), "{stdout}");
    assert!(stdout.contains("fuel ") && stdout.contains(" ms"), "{stdout}");
    assert!(stdout.contains("log  info: rejected"), "{stdout}");
    assert!(!stdout.contains("route"), "a rejected message is not routed: {stdout}");

    let (ok, stdout, _) = plugin_test("roomcast_plugin_welcome", "plugins/events/welcome.json");
    assert!(ok);
    assert!(stdout.contains(r#"Some("Welcome to demo, alice! You are in #general, #ops.")"#), "{stdout}");
}

#[test]
fn plugin_test_reports_faults_and_refused_components_with_a_failing_status() {
    let event = std::env::temp_dir().join(format!("roomcast-loop-{}.json", std::process::id()));
    std::fs::write(
        &event,
        r#"{"message": {"id": "1", "tenant": "t", "room": "r", "user_id": "u", "body": "loop", "timestamp": "x"}}"#,
    )
    .unwrap();
    let (ok, stdout, _) = plugin_test_with("roomcast_hostile_plugin", &event);
    assert!(!ok);
    assert!(stdout.contains("FAULT ran out of fuel"));

    let (ok, _, stderr) = plugin_test("roomcast_stranger_plugin", "plugins/events/spam.json");
    assert!(!ok);
    assert!(stderr.contains("does not implement roomcast:plugin/tenant-plugin"), "{stderr}");
    let _ = std::fs::remove_file(event);
}

/// `roomcast plugin test` runs the host on a thread of its own: a plugin that prints, panics,
/// sleeps, reads stdin or opens a socket gets its verdict or fault, never a crashed CLI. And it
/// runs a message as the processor does: one fresh instance, the input and frame checks, routing
/// narrowed to the limits, randomness seeded from the record.
#[test]
fn plugin_test_survives_every_capability_probe_and_applies_the_processors_checks() {
    let probe = |body: &str| {
        let event = std::env::temp_dir().join(format!("roomcast-probe-{}-{}.json", body.len(), std::process::id()));
        let frame = serde_json::json!({"message": {"id": "1", "tenant": "t", "room": "r", "user_id": "u", "body": body, "timestamp": "x"}});
        std::fs::write(&event, frame.to_string()).unwrap();
        let (_, stdout, stderr) = plugin_test_with("roomcast_hostile_plugin", &event);
        let _ = std::fs::remove_file(event);
        assert!(!stderr.contains("runtime"), "{body}: the CLI crashed: {stderr}");
        stdout
    };
    for (body, expected) in [
        ("print", "on-message     FAULT trapped"),
        ("trap", "on-message     FAULT trapped"),
        // Sleeps are virtual: the clocks stand at the record's time and move only by a sleep.
        ("sleep", "on-message     Verdict::Accept"),
        ("sleep-clock", r#"Rewrite("2500 2500")"#),
        ("sleep-forever", "on-message     FAULT "),
        ("stdin", r#"Rewrite("stdin: Ok(0)")"#),
        ("socket", r#"Rewrite("socket: Err("#),
        // Routing is bounded by entries, rooms and users, as in the processor.
        ("route-wide", "on-message     FAULT routed to 9 extra rooms; the limit is 8"),
        ("route-aliased", "on-message     FAULT returned an output"),
        ("route-to-bob", r#"only_users: Some(["bob"])"#),
        // A rewrite past what the recipients' frame can carry.
        ("giant", "on-message     FAULT returned an output"),
    ] {
        let stdout = probe(body);
        assert!(stdout.contains(expected), "{body}: expected {expected:?} in:\n{stdout}");
    }
    // Too large for the plugin: refused before any guest code runs.
    let stdout = probe(&"x".repeat(200 << 10));
    assert!(stdout.contains("on-message     FAULT was given an input of"), "{stdout}");
    // Random numbers come from the record: two runs print the same decision.
    let decision = |out: String| out.lines().find(|l| l.starts_with("on-message")).map(str::to_string);
    let first = decision(probe("random"));
    assert!(first.as_deref().is_some_and(|l| l.contains("Rewrite(")), "{first:?}");
    assert_eq!(decision(probe("random")), first);
}

/// `roomcast table create`, `plugin upload`, `list`, `activate` and `disable` against the moto
/// server `scripts/test` starts (ROOMCAST_TEST_DYNAMODB_ENDPOINT).
#[test]
fn plugin_upload_list_activate_and_disable_against_a_dynamodb_endpoint() {
    let endpoint = std::env::var("ROOMCAST_TEST_DYNAMODB_ENDPOINT")
        .expect("ROOMCAST_TEST_DYNAMODB_ENDPOINT: run scripts/test, which starts moto and sets it");
    let table = format!("cli-{}", std::process::id());
    let roomcast = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(args)
            .args(["--dynamodb-endpoint", &endpoint, "--table", &table])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .output()
            .expect("run roomcast");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let moderation = wasm("roomcast_plugin_moderation");
    let moderation = moderation.to_str().unwrap();
    assert!(roomcast(&["table", "create"]).0);
    let (ok, out) = roomcast(&["plugin", "upload", "--tenant", "acme", moderation]);
    assert!(ok, "{out}");
    let version =
        out.split("version ").nth(1).and_then(|s| s.split_whitespace().next()).expect("a version").to_string();
    let (ok, out) = roomcast(&["plugin", "list", "--tenant", "acme"]);
    assert!(ok && out.contains(&version) && out.contains("uploaded"), "{out}");

    let (ok, out) = roomcast(&["plugin", "activate", "--tenant", "acme", "--version", &version]);
    assert!(ok, "{out}");
    let (_, out) = roomcast(&["plugin", "list", "--tenant", "acme"]);
    assert!(out.starts_with(&format!("* {version}")), "the active version is marked: {out}");
    assert!(!roomcast(&["plugin", "activate", "--tenant", "acme", "--version", "nope"]).0);
    assert!(roomcast(&["plugin", "disable", "--tenant", "acme"]).0);
    let (_, out) = roomcast(&["plugin", "list", "--tenant", "acme"]);
    assert!(out.starts_with("  "), "nothing active: {out}");

    let stranger = wasm("roomcast_stranger_plugin");
    let (ok, out) = roomcast(&["plugin", "upload", "--tenant", "acme", stranger.to_str().unwrap()]);
    assert!(!ok && out.contains("does not implement"), "refused before upload: {out}");
}

/// `roomcast plugin … --dev URL` against a running `roomcast dev` with its embedded store: the
/// upload lands in that process's store, its stream activates it, and list, activate and disable
/// act on it — all from another process, as from a second terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_upload_into_a_running_dev_stack_with_the_embedded_store() {
    let stack = roomcast::dev::start(roomcast::dev::DevOptions { port: 0, ..Default::default() }).await.unwrap();
    let url = format!("http://{}", stack.addr);
    let roomcast = |args: Vec<String>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
                    .args(&args)
                    .args(["--dev", &url])
                    .env_remove("DYNAMODB_ENDPOINT_URL")
                    .output()
                    .expect("run roomcast");
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
                )
            })
            .await
            .unwrap()
        }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let moderation = wasm("roomcast_plugin_moderation").display().to_string();

    let (ok, out) =
        roomcast(args(&format!("plugin upload --tenant acme --policy closed --fuel 2000000 {moderation}"))).await;
    assert!(ok, "{out}");
    let version = out.split("version ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();

    // The stack's processor activates it from the embedded store's stream.
    let mut listed = String::new();
    for _ in 0..100 {
        listed = roomcast(args("plugin list --tenant acme")).await.1;
        // Activation writes the version's status, then the ACTIVE pointer (`*`): wait for both.
        if listed.starts_with('*') && listed.contains("active") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(listed.starts_with(&format!("* {version}  active")), "{listed}");
    assert!(listed.contains(r#"limits {"fuel":2000000}"#), "{listed}");

    // Refusals come back as the command's error, and nothing is written.
    let stranger = wasm("roomcast_stranger_plugin").display().to_string();
    let (ok, out) = roomcast(args(&format!("plugin upload --tenant acme {stranger}"))).await;
    assert!(!ok && out.contains("does not implement roomcast:plugin/tenant-plugin"), "{out}");
    let (ok, out) = roomcast(args("plugin activate --tenant acme --version nope")).await;
    assert!(!ok && out.contains("no uploaded version nope"), "{out}");
    assert_eq!(roomcast(args("plugin list --tenant acme")).await.1.lines().count(), 1);

    assert!(roomcast(args("plugin disable --tenant acme")).await.0);
    assert!(roomcast(args("plugin list --tenant acme")).await.1.starts_with("  "), "nothing active");
    assert!(roomcast(args(&format!("plugin activate --tenant acme --version {version}"))).await.0);
    assert!(roomcast(args("plugin list --tenant acme")).await.1.starts_with('*'));

    // A tenant's settings, written into the running stack's table and read back.
    let (ok, out) = roomcast(args("tenant show acme")).await;
    assert!(ok && !out.contains("presenceAnnounceMaxUsers"), "unset: {out}");
    let (ok, out) = roomcast(args("tenant set acme --presence-announce-max-users 7")).await;
    assert!(ok && out.contains(r#""presenceAnnounceMaxUsers": 7"#), "{out}");
    let stored = stack.store.tenant_settings("acme").await.unwrap().expect("written");
    assert_eq!(stored.presence_announce_max_users, Some(7));
    let (ok, out) = roomcast(args("tenant set bad#name --presence-announce-max-users 7")).await;
    assert!(!ok && out.contains("contains '#'"), "{out}");
    // Its own rate limits, by name; an unknown name is refused with the list.
    let (ok, out) =
        roomcast(args("tenant set acme --limit messages-per-connection=3 --limit joins_per_tenant=0")).await;
    assert!(ok && out.contains(r#""messages_per_connection": 3"#), "{out}");
    let stored = stack.store.tenant_settings("acme").await.unwrap().expect("written");
    assert_eq!(stored.rate_limits.get("messages_per_connection"), Some(&3));
    assert_eq!(stored.rate_limits.get("joins_per_tenant"), Some(&0));
    let (ok, out) = roomcast(args("tenant set acme --limit messages_per_room=3")).await;
    assert!(!ok && out.contains("no limit is called") && out.contains("messages_per_user"), "{out}");
    // Its own identity provider, then a revocation.
    let (ok, out) = roomcast(args("tenant revoke acme --user ann")).await;
    assert!(!ok && out.contains("no identity of its own"), "{out}");
    let (ok, out) = roomcast(args(
        "tenant identity acme --jwks-url https://idp.example/jwks --issuer https://idp.example --audience rc",
    ))
    .await;
    assert!(ok && out.contains(r#""jwksUrl": "https://idp.example/jwks""#), "{out}");
    let (ok, out) =
        roomcast(args("tenant identity acme --jwks-url http://idp.example/jwks --issuer i --audience a")).await;
    assert!(!ok && out.contains("not https"), "{out}");
    let (ok, out) = roomcast(args("tenant revoke acme --user ann")).await;
    assert!(ok, "{out}");
    let stored = stack.store.tenant_identity("acme").await.unwrap().expect("written");
    assert_eq!(stored.issuer.as_deref(), Some("https://idp.example"));
    assert!(stored.users_revoked_before.contains_key("ann"), "{stored:?}");

    // A backend's message through the stack's publish endpoint, as a tenant's backend sends it.
    let (ok, out) = roomcast(args("publish --tenant acme --room general --idempotency-key k-1 order-shipped")).await;
    assert!(ok && out.starts_with("published "), "{out}");
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let (ok, again) = roomcast(args("publish --tenant acme --room general --idempotency-key k-1 order-shipped")).await;
    assert!(ok && again.contains(&id), "the same key answers the first id: {again}");
    let history = stack
        .store
        .history("acme", "general", &roomcast::store::HistoryFrom::Latest, 10, chrono::Utc::now(), None)
        .await
        .unwrap();
    assert_eq!(
        history.iter().map(|m| (m.id.as_str(), m.body.as_str())).collect::<Vec<_>>(),
        [(id.as_str(), "order-shipped")]
    );
    let (ok, out) = roomcast(args("publish --tenant acme --room a#b x")).await;
    assert!(!ok && out.contains("room"), "{out}");

    // As to a deployed stack's tenant endpoint: HTTP(S), with a tenant's publish token.
    let claims = roomcast::auth::Claims {
        tenant: "acme".into(),
        sub: "shop".into(),
        exp: chrono::Utc::now().timestamp() + 600,
        nbf: None,
        scope: Some("publish".into()),
        rooms: None,
        extra: Default::default(),
    };
    let token = roomcast::auth::mint(&claims, b"roomcast-dev-secret");
    let endpoint = format!("{url}/publish");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args([
                "publish",
                "--tenant",
                "acme",
                "--room",
                "general",
                "via-endpoint",
                "--endpoint",
                &endpoint,
                "--token",
                &token,
            ])
            .output()
            .expect("run roomcast")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.starts_with("published "), "{text}");
    stack.shutdown().await;

    // A dev stack that is not there is a clear error.
    let (ok, out) = roomcast(args("plugin list --tenant acme")).await;
    assert!(!ok && out.contains("is `roomcast dev` running there?"), "{out}");
}

/// `roomcast capture` reads a moto table's stream into JSON lines (from the trim horizon, or at
/// a sequence number), and `roomcast replay` reads them back; skipped records give exit status 2.
#[test]
fn capture_a_stream_and_replay_it() {
    let endpoint = std::env::var("ROOMCAST_TEST_DYNAMODB_ENDPOINT")
        .expect("ROOMCAST_TEST_DYNAMODB_ENDPOINT: run scripts/test, which starts moto and sets it");
    let table = format!("capture-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("roomcast-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let roomcast = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(args)
            .env("DYNAMODB_ENDPOINT_URL", &endpoint)
            .env("TABLE_NAME", &table)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .output()
            .expect("run roomcast");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(roomcast(&["table", "create"]).0, Some(0));
    // Records to capture: an upload writes the component's chunks and its metadata.
    let welcome = wasm("roomcast_plugin_welcome");
    let (code, _, err) = roomcast(&["plugin", "upload", "--tenant", "acme", welcome.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");

    let all = dir.join("all.jsonl");
    let (code, _, err) = roomcast(&["capture", "--until-idle", "--out", all.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let text = std::fs::read_to_string(&all).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(records.len() >= 2, "{text}");
    assert!(err.contains(&format!("captured {} records", records.len())), "progress on stderr: {err}");
    assert!(records.iter().all(|r| r["eventName"] == "INSERT" && r["dynamodb"]["SequenceNumber"].is_string()));

    // From a sequence number on, and at most one record.
    let second = records[1]["dynamodb"]["SequenceNumber"].as_str().unwrap();
    let one = dir.join("one.jsonl");
    let from = format!("at:{second}");
    let (code, _, err) = roomcast(&["capture", "--from", &from, "--limit", "1", "--out", one.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let one: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&one).unwrap().trim()).unwrap();
    assert_eq!(one["dynamodb"]["SequenceNumber"], second);
    let (code, _, err) = roomcast(&["capture", "--from", "yesterday", "--out", "x.jsonl"]);
    assert!(code != Some(0) && err.contains("not trim-horizon, latest or at:SEQUENCE_NUMBER"), "{err}");

    // Replay what was captured: no table needed with --membership-from-stream.
    let (code, out, err) = roomcast(&["replay", all.to_str().unwrap(), "--membership-from-stream"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("INSERT plugin acme version") && out.contains("plugin   would activate acme version"),
        "{out}"
    );
    assert!(err.contains(&format!("replayed {} records", records.len())) && err.contains("dry run"), "{err}");

    // AWS's example event holds records of another application's table: each is reported and
    // skipped, and the exit status says so.
    let example = root().join("tests/fixtures/example-dynamodb-event.json");
    let (code, out, _) = roomcast(&["replay", example.to_str().unwrap(), "--membership-from-stream", "--json"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["skipped"].is_string()), "{out}");
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["replay", example.to_str().unwrap()])
        .env_remove("TABLE_NAME")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--membership-from-stream"), "no source of room members: {err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `roomcast bench` at a small scale: it starts its own `roomcast dev`, drives it over real
/// WebSockets, and accounts for every delivery. No speed is asserted (timed tests flake on
/// shared machines): the figures belong in docs/PERFORMANCE.md.
#[test]
fn bench_drives_the_local_stack_and_reports_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["bench", "--connections", "30", "--room-size", "10", "--messages", "12", "--rate", "100"])
        .args(["--raw-posts", "300", "--plugin-tenants", "2", "--json", "--plugin"])
        .arg(wasm("roomcast_plugin_moderation"))
        .args(["--hostile-rate", "50", "--hostile"])
        .arg(wasm("roomcast_hostile_plugin"))
        .output()
        .expect("run roomcast bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!((report["rooms"].as_u64(), report["connections"].as_u64()), (Some(3), Some(30)));
    assert!(report["raw_posts_per_second"].as_f64().unwrap() > 0.0, "{report}");
    let phases = report["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names[..2], ["no plugin", "plugin"]);
    assert!(names[2].starts_with("plugin, beside a hostile tenant ("), "{names:?}");
    assert!(!names[2].contains("(0 hostile"), "the hostile tenant sent nothing: {names:?}");
    // Beside a tenant flooding past its rate limits: refused, closed, and the measured tenant's
    // every delivery still made (below).
    assert!(names[3].starts_with("no plugin, beside a flooding tenant ("), "{names:?}");
    let flood = &phases[3]["flood"];
    assert!(flood["rate_limited"].as_u64().unwrap() > 0, "{flood}");
    assert!(flood["taken"].as_u64().unwrap() < flood["sent"].as_u64().unwrap(), "{flood}");
    for phase in phases {
        assert!(phase["settled_rss_mib"].as_f64().unwrap() > 1.0, "{phase}");
        // 12 messages over 3 rooms of 10: every member (the sender included) receives each one.
        assert_eq!((phase["expected"].as_u64(), phase["deliveries"].as_u64()), (Some(120), Some(120)), "{phase}");
        assert!(phase["stream_records"].as_u64().unwrap() >= 12, "{phase}");
        let (p50, p99) = (phase["latency_p50_ms"].as_f64().unwrap(), phase["latency_p99_ms"].as_f64().unwrap());
        assert!(p50 > 0.0 && p99 >= p50, "{phase}");
        assert!(phase["cpu_us_per_record"].as_f64().is_some() && phase["peak_rss_mib"].as_f64().unwrap() > 1.0);
    }
    assert_eq!(report["memory"]["tenants"], 2);
    assert!(report["memory"]["rss_after_mib"].as_f64().unwrap() > 1.0, "{report}");
}

/// `roomcast bench fanout` at a small scale, on the embedded store and on moto behind the
/// partition layer: its `@connections` child answers every member, each message once, and the
/// report carries every figure. No speed is asserted.
#[test]
fn bench_fanout_serves_each_member_once_and_reports_the_reads() {
    let endpoint = std::env::var("ROOMCAST_TEST_DYNAMODB_ENDPOINT")
        .expect("ROOMCAST_TEST_DYNAMODB_ENDPOINT: run scripts/test, which starts moto and sets it");
    for (with_table, roster) in [(false, true), (true, true), (true, false)] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_roomcast"));
        command.args(["bench", "fanout", "--room-sizes", "40,1100", "--messages", "2", "--latency", "2ms"]);
        // The room of 1,100 goes through the fan-out stage, the room of 40 is served in its batch.
        command.args(["--quota", "20000", "--handoff-recipients", "1000", "--json"]);
        if with_table {
            command.args(["--dynamodb-endpoint", &endpoint]);
        }
        if !roster {
            command.arg("--no-roster");
        }
        let out = command
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .output()
            .expect("run roomcast bench fanout");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
        let rooms = report["rooms"].as_array().unwrap();
        assert_eq!(rooms.len(), 2, "{report}");
        for (room, size) in rooms.iter().zip([40u64, 1100]) {
            assert_eq!(room["room_size"].as_u64(), Some(size), "{room}");
            // Both messages to every member, and to each of the room of ten in the next batch.
            assert_eq!(room["deliveries"].as_u64(), Some(2 * (size + 10)), "{room}");
            assert_eq!(room["staged"], size >= 1000, "{room}");
            assert!(room["small_room_served_s"].as_f64().unwrap() > 0.0, "{room}");
            assert_eq!(room["served_once_each"], true, "{room}");
            assert_eq!(room["batch_failed"], false, "{room}");
            assert!(room["cpu_us_per_delivery"].as_f64().unwrap() > 0.0, "{room}");
            let reads = &room["reads"];
            match (with_table, roster) {
                (false, _) => assert!(reads.is_null(), "{room}"),
                // The first message reads the room and its version, the second the version alone.
                (true, true) => {
                    assert_eq!((reads["full_reads"].as_u64(), reads["kept"].as_u64()), (Some(1), Some(1)), "{room}");
                    assert_eq!(reads["items_per_message"].as_f64(), Some((size + 2) as f64 / 2.0), "{room}");
                }
                // Without rosters every member is read for each message: the read grows with the room.
                (true, false) => {
                    assert_eq!((reads["full_reads"].as_u64(), reads["kept"].as_u64()), (Some(2), Some(0)), "{room}");
                    assert_eq!(reads["items_per_message"].as_f64(), Some(size as f64), "{room}");
                }
            }
        }
    }
}

/// `roomcast bench costs` at a small scale: the sweep reads the stale connections and the present
/// users (and each of their rooms once), not the table; a history page of big
/// messages reads about a frame, one of small ones no more than before. No speed is asserted.
#[test]
fn bench_costs_reads_what_is_served_not_the_table() {
    let endpoint = std::env::var("ROOMCAST_TEST_DYNAMODB_ENDPOINT")
        .expect("ROOMCAST_TEST_DYNAMODB_ENDPOINT: run scripts/test, which starts moto and sets it");
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["bench", "costs", "--dynamodb-endpoint", &endpoint, "--messages", "3000", "--connections", "300"])
        .args(["--stale", "7", "--room-size", "30", "--latency", "2ms", "--json"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run roomcast bench costs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let items = |path: &str| {
        report.pointer(path).and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("{path}: {report}"))
    };
    // 3,000 messages, 60 big ones, and per connection its record, membership and presence.
    assert_eq!(items("/table_items"), 3000 + 60 + 3 * 300, "{report}");
    assert_eq!(items("/sweep_before/items"), items("/table_items"));
    assert_eq!((items("/checked"), items("/cleaned"), items("/shards")), (7, 7, 16), "{report}");
    assert_eq!(items("/sweep_stale/items"), 7, "the stale connections alone: {report}");
    assert_eq!(items("/sweep_present/items"), 300, "every present user once: {report}");
    assert_eq!(items("/sweep_other/items"), 300, "each room's memberships once: {report}");
    assert!(items("/sweep_after/items") < items("/sweep_before/items") / 3, "{report}");
    let history = report["history"].as_array().unwrap();
    let (small, big) = (&history[0], &history[1]);
    assert_eq!(small["returned"], 101, "{report}");
    assert!(small["after"]["items"].as_u64() <= small["before"]["items"].as_u64(), "{report}");
    assert_eq!(big["returned"], 7, "the newest 7 of 20 KB pass a frame: {report}");
    assert!(big["after"]["items"].as_u64().unwrap() <= 12 && big["before"]["items"].as_u64() == Some(60), "{report}");
}

/// `roomcast poll` runs the same processor as the Lambda, tenant plugins included: an upload to
/// the table is activated from the stream it polls.
#[test]
fn poll_activates_uploaded_plugins_from_the_stream() {
    let endpoint = std::env::var("ROOMCAST_TEST_DYNAMODB_ENDPOINT")
        .expect("ROOMCAST_TEST_DYNAMODB_ENDPOINT: run scripts/test, which starts moto and sets it");
    let table = format!("poll-{}", std::process::id());
    let command = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_roomcast"));
        command
            .args(args)
            .env("DYNAMODB_ENDPOINT_URL", &endpoint)
            .env("TABLE_NAME", &table)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
        command
    };
    assert!(command(&["table", "create"]).status().unwrap().success());
    let moderation = wasm("roomcast_plugin_moderation");
    let out = command(&["plugin", "upload", "--tenant", "acme", moderation.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut poll = command(&["poll", "--from-trim-horizon"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut listed = String::new();
    for _ in 0..150 {
        listed = String::from_utf8_lossy(&command(&["plugin", "list", "--tenant", "acme"]).output().unwrap().stdout)
            .into_owned();
        // Activation writes the version's status, then the ACTIVE pointer (`*`): wait for both.
        if listed.starts_with('*') && listed.contains("active") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = poll.kill();
    let _ = poll.wait();
    assert!(listed.starts_with('*') && listed.contains("active"), "poll activated the upload: {listed}");
}

/// `roomcast publish --endpoint` without a token signs the request with SigV4 for the function
/// URL (service `lambda`), with the environment's AWS credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_function_url_is_sigv4_signed() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None::<axum::http::HeaderMap>));
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let record = record.clone();
        async move {
            *record.lock().unwrap() = Some(headers);
            axum::Json(serde_json::json!({"id": "the-id"}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["publish", "--tenant", "acme", "--room", "general", "hi", "--endpoint", &format!("http://{addr}/")])
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "eu-west-1")
            .output()
            .expect("run roomcast")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("published the-id"), "{text}");
    let headers = seen.lock().unwrap().clone().expect("the request");
    let authorization = headers["authorization"].to_str().unwrap();
    assert!(authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{authorization}");
    assert!(authorization.contains("/eu-west-1/lambda/aws4_request"), "{authorization}");
    assert!(headers.contains_key("x-amz-date"));
}

/// `roomcast plugin new` writes a crate that tests natively, builds to a component the host
/// accepts, and reads its configuration (`plugin test --config`).
#[test]
fn plugin_new_writes_a_crate_that_tests_builds_and_runs() {
    let dir = std::env::temp_dir().join(format!("roomcast-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sdk = root().join("plugins/sdk");
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["plugin", "new", "word-filter", "--dir"])
        .arg(&dir)
        .arg("--sdk-path")
        .arg(&sdk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let crate_dir = dir.join("word-filter");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    // Offline: everything it needs is what this workspace already fetched.
    let cargo = |args: &[&str], target_dir: PathBuf| {
        let out = Command::new(env!("CARGO"))
            .args(args)
            .arg("--offline")
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", target_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "cargo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tested = cargo(&["test"], target.join("scaffold"));
    assert!(tested.contains("configured_words_are_rejected ... ok"), "{tested}");
    cargo(&["build", "--release", "--target", "wasm32-wasip2"], target.clone());
    let component = target.join("wasm32-wasip2/release/word_filter.wasm");
    let config = dir.join("config.json");
    std::fs::write(&config, r#"{"banned": "hello"}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["plugin", "test"])
        .arg(&component)
        .arg("--event")
        .arg(crate_dir.join("events/message.json"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("world 0.2.0") && stdout.contains("on-message     Verdict::Reject"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&component);
}
