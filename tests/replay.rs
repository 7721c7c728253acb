//! Replay: a recorded session (real handlers, the table's real stream, the real processor and
//! SDK client) replays to the effects the live run performed; the input forms agree; a plugin
//! comparison flags exactly the records decided differently; a failure destination's message
//! refetches its records from moto's stream; malformed input is reported and skipped.

use aws_lambda_events::dynamodb::EventRecord;
use roomcast::plugins::registry::Policy;
use roomcast::replay::{Compare, Execute, Options, Summary, replay};
use roomcast_tests::{Stack, component};
use serde_json::{Value, json};

/// Runs a session on `stack` with acme moderated; returns the captured stream.
async fn session(stack: &mut Stack) -> Vec<EventRecord> {
    stack.install_plugin("acme", "roomcast-plugin-moderation", Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "general").await;
    stack.pump().await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    stack.connect("eve", "globex", "eve", "general").await;
    stack.pump().await;
    for (who, frame) in [
        ("ann", json!({"action":"join","room":"ops"})),
        ("bob", json!({"action":"join","room":"ops"})),
        ("ann", json!({"action":"sendMessage","room":"general","message":"hello"})),
        ("bob", json!({"action":"sendMessage","room":"general","message":"buy spam now"})),
        ("ann", json!({"action":"sendMessage","room":"ops","message":"   deploy at five   "})),
        ("eve", json!({"action":"sendMessage","room":"general","message":"spam is fine here"})),
        ("ann", json!({"action":"leave","room":"ops"})),
    ] {
        stack.send(who, frame).await;
        stack.pump().await;
    }
    stack.disconnect("bob").await;
    stack.pump().await;
    stack.captured.clone()
}

fn lines(records: &[EventRecord]) -> String {
    records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect()
}

fn from_stream(plugins: Vec<(String, Vec<u8>)>) -> Options {
    Options { membership_from_stream: true, plugins, ..Options::default() }
}

fn moderation() -> Vec<(String, Vec<u8>)> {
    vec![("acme".to_string(), component("roomcast-plugin-moderation"))]
}

async fn run(text: &str, options: &Options) -> (String, Summary) {
    let mut out = Vec::new();
    let summary = replay(text, options, &mut out).await.expect("replay");
    (String::from_utf8(out).unwrap(), summary)
}

/// (connection, payload) for every send, sorted: what was (or would be) posted.
fn sends_in(jsonl: &str) -> Vec<(String, Value)> {
    let mut sends = Vec::new();
    for line in jsonl.lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        for effect in entry["effects"].as_array().into_iter().flatten() {
            for to in effect["to"].as_array().into_iter().flatten() {
                sends.push((to.as_str().unwrap().to_string(), effect["send"].clone()));
            }
        }
    }
    sends.sort_by(|a, b| (&a.0, a.1.to_string()).cmp(&(&b.0, b.1.to_string())));
    sends
}

#[tokio::test]
async fn a_recorded_session_replays_to_the_effects_the_live_run_performed() {
    let mut stack = Stack::memory().await;
    session(&mut stack).await;
    // A TTL expiry: Cy arrives later; then Ann's connection and membership outlive their TTL
    // (600 s here) and DynamoDB's TTL removes them, which Cy sees.
    use roomcast::model::Clock;
    stack.clock.advance(chrono::Duration::seconds(500));
    stack.connect("cy", "acme", "cy", "general").await;
    stack.pump().await;
    stack.clock.advance(chrono::Duration::seconds(200));
    let expired = stack.table.memory.as_ref().unwrap().expire_due(stack.clock.now());
    assert!(expired >= 2, "{expired}");
    stack.pump().await;
    let records = stack.captured.clone();
    assert!(records.iter().any(roomcast::stream::is_ttl_deletion), "the capture holds a TTL deletion");

    let mut live: Vec<(String, Value)> =
        stack.recorder.calls().into_iter().filter(|c| c.status == 200).map(|c| (c.connection_id, c.body)).collect();
    live.sort_by(|a, b| (&a.0, a.1.to_string()).cmp(&(&b.0, b.1.to_string())));
    assert!(live.iter().any(|(_, b)| b["action"] == "rejected"), "the session has a rejection");
    assert!(live.iter().any(|(_, b)| b["action"] == "presence" && b["reason"] == "expired"));

    let options = Options { json: true, ..from_stream(moderation()) };
    let (out, summary) = run(&lines(&records), &options).await;
    assert_eq!(summary, Summary { replayed: records.len(), ..Summary::default() });
    assert_eq!(sends_in(&out), live, "replay decides exactly what the live run delivered");

    // The rejection is explained: the plugin call, its verdict and fuel, and the one effect.
    let spam: Value = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["change"]["body"] == "buy spam now")
        .unwrap();
    assert_eq!(spam["plugin_calls"][0]["hook"], "on-message");
    assert!(spam["plugin_calls"][0]["outcome"].as_str().unwrap().starts_with("Verdict::Reject("), "{spam}");
    assert!(spam["plugin_calls"][0]["fuel"].as_u64().unwrap() > 0);
    // Two effects: the verdict recorded on the message (history never lists it), and the
    // `rejected` to its sender.
    assert_eq!(spam["effects"].as_array().unwrap().len(), 2, "{spam}");
    assert!(spam["effects"][0]["mark_message"]["verdict"]["rejected"].is_string(), "{spam}");
    assert_eq!(spam["effects"][1]["to"], json!(["bob"]));
    // Nothing was sent or written by the replay.
    assert_eq!(stack.recorder.calls().len(), live.len());
}

#[tokio::test]
async fn the_event_form_and_the_json_lines_form_print_the_same_and_runs_are_identical() {
    let mut stack = Stack::memory().await;
    let records = session(&mut stack).await;
    let event = json!({ "Records": records }).to_string();
    for json in [false, true] {
        let options = Options { json, ..from_stream(moderation()) };
        let (from_lines, _) = run(&lines(&records), &options).await;
        let (from_event, _) = run(&event, &options).await;
        assert_eq!(from_lines, from_event);
        let (again, _) = run(&lines(&records), &options).await;
        assert_eq!(from_lines, again, "byte-identical on a second run");
    }
    let (text, _) = run(&lines(&records), &from_stream(moderation())).await;
    assert!(text.contains("INSERT message acme/general by bob (bob): \"buy spam now\""), "{text}");
    assert!(
        text.contains("on-message Verdict::Reject(\"the word \\\"spam\\\" is not allowed here\")  fuel "),
        "{text}"
    );
    assert!(text.contains("log info: rejected"), "{text}");
    assert!(text.contains("send     {\"action\":\"rejected\""), "{text}");
    assert!(text.contains("remove   membership acme/general of bob (disconnect)"), "{text}");
    // Presence decisions, from the replay's own presence state: who became present or absent, in
    // a room of how many, and whether it was announced.
    assert!(text.contains("presence joined (room users 2)"), "{text}");
    assert!(text.contains("presence left (room users 1)"), "{text}");
    let (jsonl, _) = run(&lines(&records), &Options { json: true, ..from_stream(moderation()) }).await;
    let decisions: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|e| e.get("presence").cloned())
        .collect();
    let joined = decisions.iter().filter(|p| p["transition"] == "joined").count();
    let left = decisions.iter().filter(|p| p["transition"] == "left").count();
    // ann, bob and eve in general, ann and bob in ops; ann left ops, bob left both.
    assert_eq!((joined, left), (5, 3), "{decisions:?}");
    assert!(decisions.iter().all(|p| p["announced"] == (p["transition"] != Value::Null)), "{decisions:?}");
}

#[tokio::test]
async fn a_comparison_flags_exactly_the_records_a_changed_plugin_decides_differently() {
    let mut stack = Stack::memory().await;
    let records = session(&mut stack).await;
    let options = Options {
        json: true,
        compare: Some(Compare {
            tenant: "acme".into(),
            old: component("roomcast-plugin-moderation"),
            new: component("roomcast-plugin-welcome"),
        }),
        ..from_stream(Vec::new())
    };
    let (out, summary) = run(&lines(&records), &options).await;

    // The welcome plugin greets (moderation does not) and accepts everything (moderation rejects
    // spam and trims): acme's connections, the spam and the padded message differ; nothing else.
    let expected: Vec<String> = records
        .iter()
        .filter(|r| {
            let change = roomcast::stream::Change::from_record(r);
            match change {
                roomcast::stream::Change::Inserted(roomcast::stream::Record::Connection(c)) => c.tenant == "acme",
                roomcast::stream::Change::Inserted(roomcast::stream::Record::Message(m)) => {
                    m.tenant == "acme" && m.body != "hello"
                }
                _ => false,
            }
        })
        .map(|r| r.event_id.clone())
        .collect();
    assert_eq!(expected.len(), 4);
    let flagged: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(flagged, expected);
    assert_eq!(summary.differing, 4);
    let spam: Value = out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).nth(2).unwrap();
    assert!(spam["old"]["plugin_calls"][0]["outcome"].as_str().unwrap().starts_with("Verdict::Reject"), "{spam}");
    assert_eq!(spam["new"]["plugin_calls"][0]["outcome"], "Verdict::Accept");
    assert_eq!(spam["new"]["effects"][0]["to"], json!(["ann", "bob"]));
}

#[tokio::test]
async fn a_failure_destination_message_refetches_its_records_from_the_stream() {
    let mut stack = Stack::dynamodb().await;
    let records = session(&mut stack).await;
    let arn = records[0].event_source_arn.clone().expect("records from moto's stream carry its ARN");
    let streams = aws_sdk_dynamodbstreams::Client::from_conf(
        aws_sdk_dynamodbstreams::config::Builder::from(&roomcast_tests::sdk_config().await)
            .endpoint_url(roomcast_tests::moto_endpoint())
            .build(),
    );
    let described = streams.describe_stream().stream_arn(&arn).send().await.unwrap();
    let shard = described.stream_description.unwrap().shards.unwrap()[0].shard_id.clone().unwrap();

    // The batch that "failed": records 4 to 9 of the session.
    let failed = &records[3..9];
    let seq = |r: &EventRecord| r.change.sequence_number.clone().unwrap();
    let message = json!({
        "requestContext": {"requestId": "9e6bd57c", "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:processor",
                           "condition": "RetryAttemptsExhausted", "approximateInvokeCount": 6},
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "version": "1.0", "timestamp": "2026-11-21T10:00:00.000Z",
        "DDBStreamBatchInfo": {"shardId": shard, "startSequenceNumber": seq(&failed[0]),
            "endSequenceNumber": seq(&failed[5]), "approximateArrivalOfFirstRecord": "2026-11-21T09:59:00Z",
            "approximateArrivalOfLastRecord": "2026-11-21T09:59:01Z", "batchSize": 6, "streamArn": arn}
    });
    let options = Options {
        json: true,
        table: Some(stack.table.store.clone()),
        streams: Some(streams),
        plugins: moderation(),
        ..Options::default()
    };
    let (fetched, summary) = run(&message.to_string(), &options).await;
    assert_eq!(summary.replayed, 6, "{fetched}");
    let (direct, _) = run(&lines(failed), &options).await;
    assert_eq!(fetched, direct, "the same records, fetched from the stream by their sequence numbers");

    // Without the stream there is nothing to fetch from: a clear error.
    let mut out = Vec::new();
    let err = replay(&message.to_string(), &Options { streams: None, ..options }, &mut out).await.unwrap_err();
    assert!(err.to_string().contains("fetching its records needs the stream"), "{err}");
}

#[tokio::test]
async fn malformed_input_is_reported_with_its_position_and_skipped() {
    let mut stack = Stack::memory().await;
    let records = session(&mut stack).await;
    let good = lines(&records[..3]);
    let mut unknown = serde_json::to_value(&records[0]).unwrap();
    unknown["eventID"] = json!("unknown-kind");
    unknown["dynamodb"]["Keys"] = json!({"pk": {"S": "INVOICE#1"}, "sk": {"S": "LINE#1"}});
    let text = format!(
        "{good}this is not json\n{{\"eventID\": \"e-broken\", \"eventName\": 12}}\n{}\n[1, 2]\n{}",
        unknown,
        lines(&records[3..5])
    );
    let (out, summary) = run(&text, &from_stream(moderation())).await;
    assert_eq!(summary, Summary { replayed: 5, skipped: 4, ..Summary::default() }, "{out}");
    assert!(out.contains("#4 line 4 · event ?\n   SKIPPED  not JSON"), "{out}");
    assert!(out.contains("#5 line 5 · event e-broken\n   SKIPPED  "), "{out}");
    assert!(out.contains("event unknown-kind"), "{out}");
    assert!(out.contains("INVOICE#1/LINE#1: not a record type this processor handles"), "{out}");
    assert!(out.contains("#7 line 7 · event ?\n   SKIPPED  not a JSON object"), "{out}");
    assert!(out.contains("#9 "), "records after the bad ones are replayed: {out}");
}

#[tokio::test]
async fn execute_re_drives_the_records_for_real() {
    let mut stack = Stack::memory().await;
    let records = session(&mut stack).await;
    let hello: Vec<EventRecord> =
        records.iter().filter(|r| serde_json::to_string(r).unwrap().contains("\"hello\"")).cloned().collect();
    assert_eq!(hello.len(), 1);
    stack.recorder.clear();
    let options = Options {
        table: Some(stack.table.store.clone()),
        plugins: moderation(),
        execute: Some(Execute {
            sdk: roomcast_tests::sdk_config().await,
            delivery: roomcast::deliver::DeliverySettings {
                endpoint_override: Some(stack.recorder.endpoint.clone()),
                ..Default::default()
            },
        }),
        ..Options::default()
    };
    let (out, summary) = run(&lines(&hello), &options).await;
    assert_eq!(summary.replayed, 1);
    // Bob disconnected in the session: only Ann is still in #general, and she gets it again.
    assert_eq!(stack.recorder.received_action("ann", "message")[0]["message"], "hello");
    assert!(out.contains("outcome  ann: Delivered"), "{out}");
}

#[tokio::test]
async fn with_a_table_a_replay_uses_the_tenants_active_plugin_and_writes_nothing() {
    let mut stack = Stack::memory().await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack
        .upload_plugin(
            "acme",
            &component("roomcast-plugin-moderation"),
            roomcast::model::FailurePolicy::Open,
            roomcast::plugins::LimitOverrides::default(),
        )
        .await;
    stack.pump().await;
    stack.send("bob", json!({"action":"sendMessage","room":"general","message":"buy spam now"})).await;
    stack.pump().await;
    let table_before = stack.table.store.plugins("acme").await.unwrap();

    let options = Options { json: true, table: Some(stack.table.store.clone()), ..Options::default() };
    let (out, summary) = run(&lines(&stack.captured), &options).await;
    assert_eq!(summary.skipped, 0, "{out}");
    assert!(summary.replayed > 0);
    let spam: Value = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["change"]["body"] == "buy spam now")
        .unwrap();
    assert!(spam["plugin_calls"][0]["outcome"].as_str().unwrap().starts_with("Verdict::Reject"), "{spam}");
    let sent = spam["effects"].as_array().unwrap().iter().find(|e| e.get("to").is_some()).unwrap();
    assert_eq!(sent["to"], json!(["bob"]), "recipients from the table");
    // The plugin's upload records are shown, not activated (the table says it is done); nothing
    // was written.
    let upload = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["change"]["record"] == "plugin")
        .unwrap();
    assert!(
        upload["plugin_actions"][0].as_str().unwrap().starts_with("nothing: the table no longer has acme version"),
        "{upload}"
    );
    assert_eq!(stack.table.store.plugins("acme").await.unwrap(), table_before);
    let captured = stack.captured.clone();
    assert_eq!(stack.pump().await, 0, "no write reached the table's stream");
    assert_eq!(stack.captured, captured);
}

/// A plugin whose decisions hang on randomness — `wasi:random` and a `HashMap`'s order — decides
/// each message the same live, replayed with its batch, and replayed alone: every message runs
/// on an instance of its own, so nothing drawn for one message shifts the next.
#[tokio::test]
async fn a_plugin_that_uses_randomness_replays_byte_identically_alone_or_with_its_batch() {
    let mut stack = Stack::memory().await;
    stack.install_plugin("lax", "roomcast-hostile-plugin", Policy::FailOpen);
    stack.connect("lou", "lax", "lou", "general").await;
    stack.connect("liz", "lax", "liz", "general").await;
    stack.pump().await;
    // One batch of four messages: a reused instance would hand the later ones other hash keys.
    for _ in 0..4 {
        stack.send("lou", json!({"action":"sendMessage","room":"general","message":"random"})).await;
    }
    assert_eq!(stack.pump().await, 8, "four messages, and the four rewrites recorded on them");
    let live: Vec<Value> = stack.recorder.received_action("liz", "message");
    assert_eq!(live.len(), 4);
    let texts: std::collections::HashSet<String> = live.iter().map(|m| m["message"].to_string()).collect();
    assert_eq!(texts.len(), 4, "each record draws its own numbers: {live:?}");

    let records = stack.captured.clone();
    let plugins = || vec![("lax".to_string(), component("roomcast-hostile-plugin"))];
    let to_liz = |out: &str| -> Vec<Value> {
        sends_in(out)
            .into_iter()
            .filter(|(to, send)| to == "liz" && send["action"] == "message")
            .map(|(_, s)| s)
            .collect()
    };
    let sorted = |mut frames: Vec<Value>| {
        frames.sort_by_key(|f| f["id"].to_string());
        frames
    };
    let options = Options { json: true, ..from_stream(plugins()) };
    let (whole, _) = run(&lines(&records), &options).await;
    assert_eq!(sorted(to_liz(&whole)), sorted(live.clone()), "replayed with its batch");
    let (again, _) = run(&lines(&records), &options).await;
    assert_eq!(whole, again, "byte-identical on a second run");

    // Each message alone, after the connections it needs: the same decision as in its batch.
    let is_message = |r: &EventRecord| {
        matches!(
            roomcast::stream::Change::from_record(r),
            roomcast::stream::Change::Inserted(roomcast::stream::Record::Message(_))
        )
    };
    let (messages, setup): (Vec<EventRecord>, Vec<EventRecord>) = records.into_iter().partition(is_message);
    for message in &messages {
        let alone: Vec<EventRecord> = setup.iter().cloned().chain([message.clone()]).collect();
        let (out, _) = run(&lines(&alone), &options).await;
        let replayed = to_liz(&out);
        assert_eq!(replayed.len(), 1, "{out}");
        let original = live.iter().find(|m| m["id"] == replayed[0]["id"]).unwrap();
        assert_eq!(&replayed[0], original, "replayed alone");
    }
}

/// The plugin lifecycle's effects are printed: replayed against a table where the upload still
/// waits, the record says what activating would do — and a dry run does not do it.
#[tokio::test]
async fn a_replay_prints_what_the_plugin_lifecycle_would_do_and_does_nothing() {
    use roomcast::model::{FailurePolicy, PluginStatus, plugin_chunks};
    let mut live = Stack::memory().await;
    let bytes = component("roomcast-plugin-moderation");
    let meta =
        live.upload_plugin("acme", &bytes, FailurePolicy::Open, roomcast::plugins::LimitOverrides::default()).await;
    live.pump().await;
    let records = live.captured.clone();

    // Another table, where the same upload waits for the processor.
    let pending = Stack::memory().await;
    pending.table.store.put_plugin(&meta, &plugin_chunks("acme", &meta.version, &bytes)).await.unwrap();
    let options = Options { json: true, table: Some(pending.table.store.clone()), ..Options::default() };
    let (out, _) = run(&lines(&records), &options).await;
    let upload = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["change"]["record"] == "plugin" && e["change"]["event"] == "insert")
        .unwrap();
    assert_eq!(
        upload["plugin_actions"],
        json!([format!("would activate acme version {} (a dry run activates nothing)", meta.version)]),
        "{upload}"
    );
    let still = pending.table.store.plugin("acme", &meta.version).await.unwrap().unwrap();
    assert_eq!(still.status, PluginStatus::Uploaded, "the dry run activated it");
    assert_eq!(pending.table.store.active_plugin("acme").await.unwrap(), None);
}

/// A configuration change takes effect live without a re-upload, and a replay given the same
/// configuration (`--config TENANT=FILE`) decides as the live run did, byte for byte; without it,
/// the plugin's defaults decide.
#[tokio::test]
async fn a_replay_with_the_tenants_configuration_decides_as_the_live_run_did() {
    let mut stack = Stack::memory().await;
    let banned: std::collections::BTreeMap<String, String> = [("banned".to_string(), "durian".to_string())].into();
    let config = roomcast::model::PluginConfig::new("acme", banned.clone(), stack.clock_now()).unwrap();
    stack.table.store.put_plugin_config(&config).await.unwrap();
    stack.install_plugin("acme", "roomcast-plugin-moderation", Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    for text in ["durian for lunch", "buy spam now"] {
        stack.send("ann", json!({"action":"sendMessage","room":"general","message":text})).await;
    }
    stack.pump().await;
    let rejected = stack.recorder.received_action("ann", "rejected");
    assert_eq!(rejected.len(), 1, "live: only the configured word is banned: {rejected:?}");
    let records = stack.captured.clone();

    let configured = Options { json: true, configs: vec![("acme".into(), banned)], ..from_stream(moderation()) };
    let (first, _) = run(&lines(&records), &configured).await;
    let (second, _) = run(&lines(&records), &configured).await;
    assert_eq!(first, second, "byte-identical");
    // The plugin's decisions, as sent: what the live run sent.
    let decided = |sends: Vec<(String, Value)>| -> Vec<(String, Value)> {
        sends.into_iter().filter(|(_, b)| b["action"] == "message" || b["action"] == "rejected").collect()
    };
    let mut live: Vec<(String, Value)> =
        stack.recorder.calls().into_iter().filter(|c| c.status == 200).map(|c| (c.connection_id, c.body)).collect();
    live.sort_by(|a, b| (&a.0, a.1.to_string()).cmp(&(&b.0, b.1.to_string())));
    assert_eq!(decided(sends_in(&first)), decided(live), "the replay decides as the live run did");

    let refused = |jsonl: &str| -> Vec<String> {
        sends_in(jsonl)
            .into_iter()
            .filter(|(_, b)| b["action"] == "rejected")
            .map(|(_, b)| b["reason"].as_str().unwrap().to_string())
            .collect()
    };
    // Without `--config`, the input's own configuration record decides (issue 28: it was
    // printed "(no effect)" and the plugin's defaults decided instead of what the live run did).
    let (from_input, _) = run(&lines(&records), &Options { json: true, ..from_stream(moderation()) }).await;
    assert_eq!(refused(&from_input), vec!["the word \"durian\" is not allowed here".to_string()]);
    assert!(from_input.contains("acme's configuration from the input: 1 key(s)"), "{from_input}");
    // `--config` wins over the input's: with the word list given, the other message is refused.
    let spam: std::collections::BTreeMap<String, String> = [("banned".to_string(), "spam".to_string())].into();
    let given = Options { json: true, configs: vec![("acme".into(), spam)], ..from_stream(moderation()) };
    let (overridden, _) = run(&lines(&records), &given).await;
    assert_eq!(refused(&overridden), vec!["the word \"spam\" is not allowed here".to_string()]);
}

/// A session captured while a tenant's plugin (uploaded during the capture, with its
/// configuration) rejected a message replays with no flags as it ran live (issue 28, point 2):
/// the upload's chunks in the input are reassembled and run from when the pointer named them,
/// the configuration applies, the rejection is printed (not a delivery), and recipients are
/// printed as users.
#[tokio::test]
async fn a_capture_with_its_plugin_upload_replays_with_no_flags_as_the_live_run_did() {
    use roomcast::model::FailurePolicy;
    let mut stack = Stack::memory().await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    let none = roomcast::plugins::LimitOverrides::default();
    let bytes = roomcast_tests::component("roomcast-plugin-moderation");
    stack.upload_plugin("acme", &bytes, FailurePolicy::Closed, none).await;
    let banned: std::collections::BTreeMap<String, String> = [("banned".to_string(), "durian".to_string())].into();
    let config = roomcast::model::PluginConfig::new("acme", banned, stack.clock_now()).unwrap();
    stack.table.store.put_plugin_config(&config).await.unwrap();
    stack.pump().await;
    for text in ["durian for lunch", "buy spam now"] {
        stack.send("ann", json!({"action":"sendMessage","room":"general","message":text})).await;
    }
    stack.pump().await;
    let live = stack.recorder.received_action("ann", "rejected");
    assert_eq!(live.len(), 1, "live: the configured word is refused: {live:?}");
    let records = stack.captured.clone();

    let (text, summary) = run(&lines(&records), &Options { membership_from_stream: true, ..Options::default() }).await;
    assert_eq!(summary.failed, 0, "{text}");
    assert!(text.contains("acme runs version"), "the upload in the input runs: {text}");
    assert!(text.contains("not allowed here"), "the live rejection is printed: {text}");
    let (json_out, _) =
        run(&lines(&records), &Options { json: true, membership_from_stream: true, ..Options::default() }).await;
    let rejected: Vec<Value> =
        sends_in(&json_out).into_iter().filter(|(_, b)| b["action"] == "rejected").map(|(_, b)| b).collect();
    assert_eq!(rejected.len(), 1, "{json_out}");
    assert!(rejected[0]["reason"].as_str().unwrap().contains("durian"), "{rejected:?}");
    let delivered: Vec<String> = sends_in(&json_out)
        .into_iter()
        .filter(|(_, b)| b["action"] == "message")
        .map(|(_, b)| b["message"].as_str().unwrap().to_string())
        .collect();
    assert!(!delivered.iter().any(|m| m.contains("durian")), "a delivery that never happened: {delivered:?}");
    // Recipients by user, as the input's connection records name them.
    assert!(text.contains("bob (bob)") || text.contains("ann (ann)"), "{text}");
}
