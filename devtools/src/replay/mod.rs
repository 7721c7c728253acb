//! Capture and replay: "who received what, and why" for any batch.
//!
//! * [`capture`] — reads a live table's stream (DynamoDB Streams API) into JSON lines.
//! * [`input`] — what replay reads: a Lambda event, JSON lines, or a failure destination's
//!   message (whose records it fetches from the stream).
//! * [`replay`] — runs the records through the same [`Processor`] as the Lambda, one at a time
//!   and in order, and prints every decision: the decoded change, each plugin call, each effect.
//!
//! By default nothing is sent or written: the deliverer is a dry run, plugin records are not
//! activated, and the clock is each record's own time, so the same input and plugins give
//! byte-identical output. `execute` re-drives the records for real.

pub mod capture;
pub mod captured;
pub mod input;
pub mod view;

use std::io::Write;
use std::sync::Arc;

use aws_lambda_events::dynamodb::EventRecord;
use serde::Serialize;
use serde_json::{Value, json};

use crate::assembly::Assembly;
use crate::deliver::DeliverySettings;
use crate::metrics::Metrics;
use crate::model::{Clock, ManualClock, SystemClock};
use crate::pipeline::RecordReport;
use crate::plugins::WithPlugins;
use crate::plugins::registry::{Policy, Registry};
use crate::plugins::{Limits, PluginHost};
use crate::react::Effect;
use crate::rules::{Lookups, Mode};
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::stream::{Cause, Change, Record};

use self::input::Item;
use self::view::StreamRooms;

/// How to replay.
#[derive(Clone, Default)]
pub struct Options {
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Adds each plugin call's wall time: useful, and the only output that is not deterministic.
    pub timings: bool,
    /// Room members from the input's own connection and membership records, not the table.
    pub membership_from_stream: bool,
    /// The table: room members (unless from the stream) and tenants' active plugins.
    pub table: Option<Arc<dyn Store>>,
    /// The DynamoDB Streams API, for failure destination messages.
    pub streams: Option<aws_sdk_dynamodbstreams::Client>,
    /// Tenants' plugins for this replay: (tenant, component bytes), in place of their active ones.
    pub plugins: Vec<(String, Vec<u8>)>,
    /// Tenants' plugin configurations for this replay, in place of what the table holds now: a
    /// replay with the same files decides byte for byte the same.
    pub configs: Vec<(String, std::collections::BTreeMap<String, String>)>,
    /// Replays twice, with this tenant's old and new component, and prints only the records whose
    /// decisions differ.
    pub compare: Option<Compare>,
    /// Applies the effects for real: posts through these AWS settings, deletes from the table.
    pub execute: Option<Execute>,
}

#[derive(Clone)]
pub struct Compare {
    pub tenant: String,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
}

#[derive(Clone)]
pub struct Execute {
    pub sdk: aws_config::SdkConfig,
    pub delivery: DeliverySettings,
}

/// What a replay did, for its exit status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records processed.
    pub replayed: usize,
    /// Lines or records skipped (malformed, or of a kind the processor does not act on).
    pub skipped: usize,
    /// Records that failed for a platform reason (the table unavailable).
    pub failed: usize,
    /// With `compare`: records decided differently.
    pub differing: usize,
}

/// One plugin call, as printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PluginCall {
    pub hook: &'static str,
    pub outcome: String,
    pub fuel: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_us: Option<u64>,
}

/// One entry of the input and what the processor did with it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    pub position: usize,
    /// Where a skipped entry stands in the input (`line 7`, `record 3`). Not given for records
    /// replayed, so an event and the same records as JSON lines print the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<String>,
    /// The record's time (ApproximateCreationDateTime): the replay's clock for this record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugin_calls: Vec<PluginCall>,
    /// What a plugin record made the plugin lifecycle do (or would make it do, in a dry run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugin_actions: Vec<String>,
    /// What a membership record did to its room's presence: the transition (or none), the
    /// room's users, whether the room announced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<Value>,
    /// With `execute`: each recipient's delivery outcome.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outcomes: Vec<(String, String)>,
}

impl Entry {
    /// What a plugin comparison compares: the verdicts and the effects (not fuel or logs).
    fn decision(&self) -> (Vec<(&'static str, &str)>, &[Value]) {
        // Presence is the table's state, not the plugin's: it shows in the effects it causes.
        (self.plugin_calls.iter().map(|c| (c.hook, c.outcome.as_str())).collect(), &self.effects)
    }
}

/// Replays `text` (any input form) and writes every decision to `out`.
pub async fn replay(text: &str, options: &Options, out: &mut dyn Write) -> anyhow::Result<Summary> {
    let items = resolve(input::parse(text), options).await?;
    let mut summary = Summary::default();
    match &options.compare {
        None => {
            let entries = run(&items, options, &options.plugins).await?;
            for entry in &entries {
                count(entry, &mut summary);
                if options.json {
                    writeln!(out, "{}", serde_json::to_string(entry)?)?;
                } else {
                    write_text(out, entry, "")?;
                }
            }
        }
        Some(compare) => {
            let with = |bytes: &Vec<u8>| {
                let mut plugins = options.plugins.clone();
                plugins.retain(|(tenant, _)| *tenant != compare.tenant);
                plugins.push((compare.tenant.clone(), bytes.clone()));
                plugins
            };
            let old = run(&items, options, &with(&compare.old)).await?;
            let new = run(&items, options, &with(&compare.new)).await?;
            for (old, new) in old.iter().zip(&new) {
                count(new, &mut summary);
                if old.decision() == new.decision() {
                    continue;
                }
                summary.differing += 1;
                if options.json {
                    let line = json!({
                        "position": new.position, "event_id": new.event_id,
                        "seq": new.seq, "change": new.change,
                        "old": {"plugin_calls": old.plugin_calls, "effects": old.effects},
                        "new": {"plugin_calls": new.plugin_calls, "effects": new.effects},
                    });
                    writeln!(out, "{line}")?;
                } else {
                    write_heading(out, new)?;
                    write_decisions(out, old, "   old  ")?;
                    write_decisions(out, new, "   new  ")?;
                }
            }
        }
    }
    Ok(summary)
}

fn count(entry: &Entry, summary: &mut Summary) {
    if entry.skipped.is_some() {
        summary.skipped += 1;
    } else if entry.failed.is_some() {
        summary.failed += 1;
    } else {
        summary.replayed += 1;
    }
}

/// The input's items with every failed batch's records fetched in its place.
async fn resolve(parsed: input::Parsed, options: &Options) -> anyhow::Result<Vec<Item>> {
    let input::Parsed { items, failed_batches } = parsed;
    if failed_batches.is_empty() {
        return Ok(items);
    }
    let Some(streams) = &options.streams else {
        anyhow::bail!(
            "the input names a failed batch; fetching its records needs the stream (--dynamodb-endpoint, or AWS)"
        );
    };
    let mut fetched = Vec::new();
    for (at, source, batch) in &failed_batches {
        fetched.push((*at, input::fetch(streams, batch, source).await?));
    }
    let mut all = Vec::new();
    let mut fetched = fetched.into_iter().peekable();
    for (index, item) in items.into_iter().enumerate() {
        while let Some((_, records)) = fetched.next_if(|(at, _)| *at == index) {
            all.extend(records);
        }
        all.push(item);
    }
    for (_, records) in fetched {
        all.extend(records);
    }
    Ok(all)
}

/// One pass over the items with these plugins.
async fn run(items: &[Item], options: &Options, plugins: &[(String, Vec<u8>)]) -> anyhow::Result<Vec<Entry>> {
    let metrics = Arc::new(Metrics::default());
    let record_clock = ManualClock::at(chrono::DateTime::UNIX_EPOCH);
    // The dry run or the execution is set once, here: the processor and its deliverer follow it.
    let assembly = match &options.execute {
        None => {
            let clock: Arc<dyn Clock> = record_clock.clone();
            // Without a table, an empty one: a dry run reads it (no active plugins) and never writes.
            let store = options.table.clone().unwrap_or_else(|| MemoryStore::new(clock.clone()) as Arc<dyn Store>);
            let no_aws = aws_config::SdkConfig::builder().build();
            Assembly::new(no_aws, store, clock, metrics.clone()).with_mode(Mode::DryRun)
        }
        Some(execute) => {
            let Some(store) = options.table.clone() else {
                anyhow::bail!("--execute needs the table (--table, --dynamodb-endpoint): effects delete records");
            };
            Assembly::new(execute.sdk.clone(), store, Arc::new(SystemClock), metrics.clone())
                .with_delivery(execute.delivery.clone())
        }
    };
    let registry = Arc::new(Registry::new(Arc::new(PluginHost::new()?), metrics.clone()));
    for (tenant, bytes) in plugins {
        let limits = Limits::default();
        let plugin = registry.host().compile(bytes, &limits).map_err(|e| anyhow::anyhow!("{tenant}'s plugin: {e}"))?;
        registry.install(tenant, plugin, limits, Policy::FailOpen, true);
    }
    for (tenant, values) in &options.configs {
        registry.pin_config(tenant, values.clone());
    }
    // What the capture itself says of plugins and configurations, applied in record order for
    // every tenant the flags leave alone (`--plugin` and `--config` win).
    let captured = captured::Captured::read(items);
    let given: std::collections::BTreeSet<&str> = plugins.iter().map(|(t, _)| t.as_str()).collect();
    let configured: std::collections::BTreeSet<&str> = options.configs.iter().map(|(t, _)| t.as_str()).collect();
    for tenant in captured.plugin_tenants.iter().filter(|t| !given.contains(t.as_str())) {
        if options.table.is_none() {
            eprintln!(
                "replay: {tenant} has plugin records in the input: its plugin runs from the input where its upload is \
                 in it, else by the default rules (pass --plugin {tenant}=FILE.wasm, or --table, to run it)"
            );
        }
    }
    let view = Arc::new(StreamRooms::default());
    let mut processor = Assembly { partitions_at_once: 1, ..assembly }.processor().with_plugins(registry.clone());
    if options.membership_from_stream {
        processor = processor.with_rooms(view.clone());
    }

    // One batch: each tenant's ACTIVE pointer is looked up once for the whole replay.
    let lookups = Lookups::default();
    // Replay has no deadline; a young connection's set-aside retries end with the replay.
    let window = crate::deliver::Window::unbounded();
    let mut entries = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let position = index + 1;
        let entry = match item {
            Item::Skipped { source, event_id, reason } => Entry {
                source: Some(source.clone()),
                skipped: Some(reason.clone()),
                ..Entry::new(position, event_id.clone())
            },
            Item::Record { record } => {
                let change = Change::from_record(record);
                // Whole seconds, as Lambda's events carry the time: every input form agrees.
                let seconds = record.change.approximate_creation_date_time.timestamp();
                let time = chrono::DateTime::from_timestamp(seconds, 0).unwrap_or_default();
                if options.execute.is_none() {
                    record_clock.set(time);
                }
                view.observe(&change);
                let mut notes = Vec::new();
                match captured::Captured::apply(record) {
                    Some(captured::Apply::Config { tenant, values }) if !configured.contains(tenant.as_str()) => {
                        notes.push(format!("{tenant}'s configuration from the input: {} key(s)", values.len()));
                        registry.pin_config(&tenant, values);
                    }
                    Some(captured::Apply::Pointer { tenant, version }) if !given.contains(tenant.as_str()) => {
                        notes.push(install_captured(&registry, &captured, &tenant, version.as_deref()));
                    }
                    _ => {}
                }
                let mut entry = Entry::new(position, record.event_id.clone());
                entry.seq = record.change.sequence_number.clone();
                entry.time = Some(crate::model::format_ts(&time));
                match (&change, processor.process_in_batch(record, &lookups, &window).await) {
                    (Change::Unknown { reason }, _) => entry.skipped = Some(reason.clone()),
                    (_, Err(e)) => entry.failed = Some(e.to_string()),
                    (_, Ok(report)) => fill(&mut entry, record, &report, options, &captured.users),
                }
                entry.plugin_actions.extend(notes);
                entry
            }
        };
        entries.push(entry);
    }
    window.settle().await;
    Ok(entries)
}

impl Entry {
    fn new(position: usize, event_id: String) -> Entry {
        Entry {
            position,
            source: None,
            event_id,
            seq: None,
            time: None,
            change: None,
            skipped: None,
            failed: None,
            plugin_calls: Vec::new(),
            plugin_actions: Vec::new(),
            presence: None,
            effects: Vec::new(),
            outcomes: Vec::new(),
        }
    }
}

/// The tenant's pointer moved in the input: run what it names, from the input's own upload.
fn install_captured(registry: &Registry, captured: &captured::Captured, tenant: &str, version: Option<&str>) -> String {
    let Some(version) = version else {
        registry.remove(tenant);
        return format!("{tenant} runs no plugin from here (the input's pointer)");
    };
    let Some((meta, bytes)) = captured.component(tenant, version) else {
        return format!(
            "{tenant}'s pointer names version {version}, whose upload is not in the input: its decisions below are the \
             default rules' (pass --plugin {tenant}=FILE.wasm)"
        );
    };
    let limits = Limits::default().with_overrides(&meta.limits.unwrap_or_default());
    match registry.host().compile(&bytes, &limits) {
        Ok(plugin) => {
            let policy = match meta.policy {
                crate::model::FailurePolicy::Open => Policy::FailOpen,
                crate::model::FailurePolicy::Closed => Policy::FailClosed,
            };
            registry.install(tenant, plugin, limits, policy, true);
            format!("{tenant} runs version {version} from here (its upload is in the input)")
        }
        Err(e) => format!("{tenant}'s version {version} from the input cannot load: {e}"),
    }
}

fn fill(
    entry: &mut Entry,
    record: &EventRecord,
    report: &RecordReport,
    options: &Options,
    users: &std::collections::HashMap<String, String>,
) {
    entry.change = Some(describe_change(&record.event_name, &report.change));
    entry.plugin_calls = report
        .plugin_calls
        .iter()
        .map(|call| PluginCall {
            hook: call.hook,
            outcome: call.outcome.clone(),
            fuel: call.report.fuel_used,
            log: call.report.log.clone(),
            elapsed_us: options.timings.then_some(call.report.elapsed.as_micros() as u64),
        })
        .collect();
    entry.plugin_actions = report.plugin_actions.iter().map(ToString::to_string).collect();
    entry.presence = report.presence.as_ref().map(|p| {
        json!({
            "transition": p.event.map(|e| if e == crate::protocol::PresenceEvent::Joined { "joined" } else { "left" }),
            "id": p.id,
            "users": p.users,
            "connections": p.connections,
            "announced": p.event.is_some() && p.announce,
            "redelivered": p.redelivered,
            "text": p.to_string(),
        })
    });
    entry.effects = report
        .effects
        .iter()
        .map(|effect| {
            let mut described = describe_effect(effect);
            // Who each recipient is, as far as the input says (its connection records).
            if let Some(to) = described.get("to").and_then(Value::as_array) {
                let named: Vec<Value> = to
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|id| json!(users.get(id).map_or_else(|| id.to_string(), |user| format!("{user} ({id})"))))
                    .collect();
                described["to_users"] = Value::Array(named);
            }
            described
        })
        .collect();
    if options.execute.is_some() {
        entry.outcomes = report.outcomes.iter().map(|(id, outcome)| (id.clone(), format!("{outcome:?}"))).collect();
    }
}

/// The decoded change, with the fields that say what it is.
pub fn describe_change(event: &str, change: &Change) -> Value {
    let (kind, record, cause) = match change {
        Change::Inserted(r) => ("insert", r, None),
        Change::Modified { new, .. } => ("modify", new, None),
        Change::Removed { old, cause } => ("remove", old, Some(*cause)),
        Change::Unknown { reason } => return json!({ "event": event, "unknown": reason }),
    };
    let mut value = match record {
        Record::Connection(c) => json!({
            "record": "connection", "tenant": c.tenant, "connection_id": c.connection_id,
            "user_id": c.user_id, "rooms": c.rooms, "close_reason": c.close_reason,
        }),
        Record::Membership(m) => json!({
            "record": "membership", "tenant": m.tenant, "room": m.room,
            "connection_id": m.connection_id, "user_id": m.user_id, "left_reason": m.left_reason,
        }),
        Record::Message(m) => json!({
            "record": "message", "tenant": m.tenant, "room": m.room, "id": m.id,
            "user_id": m.user_id, "connection_id": m.sender_connection_id, "body": m.body,
        }),
        Record::Plugin(p) => json!({
            "record": "plugin", "tenant": p.tenant, "version": p.version, "status": p.status,
            "note": "to run a plugin in a replay, pass --plugin TENANT=FILE.wasm",
        }),
        Record::PluginChunk { tenant } => json!({ "record": "plugin-chunk", "tenant": tenant }),
        Record::PluginActive(a) => json!({ "record": "plugin-active", "tenant": a.tenant, "version": a.version }),
        Record::State { tenant, kind } => json!({ "record": kind, "tenant": tenant }),
        Record::Signal(signal) => json!({
            "record": "signal", "tenant": signal.tenant, "room": signal.room, "id": signal.id,
            "user_id": signal.user_id, "connection_id": signal.sender_connection_id, "data": signal.data,
        }),
        Record::UserMessage(m) => json!({
            "record": "user-message", "tenant": m.tenant, "id": m.id, "user_id": m.user_id,
            "from": m.from, "body": m.body, "recipients": m.recipients.len(),
        }),
    };
    if let Value::Object(map) = &mut value {
        map.retain(|_, v| !v.is_null());
        map.insert("event".into(), json!(kind));
        if cause == Some(Cause::TtlExpired) {
            map.insert("cause".into(), json!("ttl"));
        }
    }
    value
}

fn describe_effect(effect: &Effect) -> Value {
    match effect {
        Effect::Send { payload, recipients } => {
            let mut to: Vec<&str> = recipients.iter().map(|r| r.connection_id.as_str()).collect();
            to.sort_unstable();
            let payload: Value = serde_json::from_str(&payload.to_json()).unwrap_or(Value::Null);
            json!({ "send": payload, "to": to })
        }
        Effect::MarkMessage { tenant, room, sk, verdict } => json!({
            "mark_message": {"tenant": tenant, "room": room, "sk": sk, "verdict": match verdict {
                crate::react::Verdict::Rejected(reason) => json!({"rejected": reason}),
                crate::react::Verdict::Rewritten(text) => json!({"rewritten": text}),
                crate::react::Verdict::Audience(users) => json!({"only_users": users}),
            }}
        }),
        Effect::RemoveMembership { tenant, room, connection_id, reason } => json!({
            "remove_membership": {"tenant": tenant, "room": room, "connection_id": connection_id, "reason": reason.as_str()}
        }),
        Effect::Close(to) => json!({ "close": to.connection_id }),
        Effect::KeepCopies(copies) => json!({
            "keep_copies": copies.iter().map(|c| json!({"tenant": c.tenant, "room": c.kept_in, "sk": c.sk, "from_room": c.room})).collect::<Vec<_>>()
        }),
    }
}

fn write_heading(out: &mut dyn Write, entry: &Entry) -> std::io::Result<()> {
    let mut head = format!("#{}", entry.position);
    if let Some(source) = &entry.source {
        head.push_str(&format!(" {source}"));
    }
    if let Some(seq) = &entry.seq {
        head.push_str(&format!(" · seq {seq}"));
    }
    head.push_str(&format!(" · event {}", entry.event_id));
    if let Some(time) = &entry.time {
        head.push_str(&format!(" · {time}"));
    }
    writeln!(out, "{head}")?;
    if let Some(change) = &entry.change {
        writeln!(out, "   {}", summarize_change(change))?;
    }
    Ok(())
}

fn write_text(out: &mut dyn Write, entry: &Entry, indent: &str) -> std::io::Result<()> {
    write_heading(out, entry)?;
    if let Some(reason) = &entry.skipped {
        writeln!(out, "{indent}   SKIPPED  {reason}")?;
    }
    if let Some(error) = &entry.failed {
        writeln!(out, "{indent}   FAILED   {error} (the Lambda would report it in batchItemFailures)")?;
    }
    write_decisions(out, entry, "   ")?;
    for (connection, outcome) in &entry.outcomes {
        writeln!(out, "   outcome  {connection}: {outcome}")?;
    }
    Ok(())
}

fn write_decisions(out: &mut dyn Write, entry: &Entry, indent: &str) -> std::io::Result<()> {
    let blank = " ".repeat(indent.chars().count());
    let mut first = true;
    let mut lead = || if std::mem::take(&mut first) { indent.to_string() } else { blank.clone() };
    for call in &entry.plugin_calls {
        let timing = call.elapsed_us.map(|us| format!("  {us} µs")).unwrap_or_default();
        writeln!(out, "{}{:<9} {}  fuel {}{timing}", lead(), call.hook, call.outcome, call.fuel)?;
        for line in &call.log {
            writeln!(out, "{blank}         log {line}")?;
        }
    }
    for action in &entry.plugin_actions {
        writeln!(out, "{}plugin   {action}", lead())?;
    }
    if let Some(text) = entry.presence.as_ref().and_then(|p| p["text"].as_str()) {
        writeln!(out, "{}presence {text}", lead())?;
    }
    for effect in &entry.effects {
        if let Some(to) = effect.get("to_users").or_else(|| effect.get("to")) {
            let to: Vec<&str> = to.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let to = if to.is_empty() { "nobody".to_string() } else { to.join(", ") };
            writeln!(out, "{}send     {} → {to}", lead(), effect["send"])?;
        } else if let Some(remove) = effect.get("remove_membership") {
            writeln!(
                out,
                "{}remove   membership {}/{} of {} ({})",
                lead(),
                remove["tenant"].as_str().unwrap_or(""),
                remove["room"].as_str().unwrap_or(""),
                remove["connection_id"].as_str().unwrap_or(""),
                remove["reason"].as_str().unwrap_or("")
            )?;
        }
    }
    if entry.plugin_calls.is_empty()
        && entry.plugin_actions.is_empty()
        && entry.presence.is_none()
        && entry.effects.is_empty()
        && entry.skipped.is_none()
        && entry.failed.is_none()
    {
        writeln!(out, "{}(no effect)", lead())?;
    }
    Ok(())
}

/// `INSERT message acme/general by ann: "hello"` and the like.
fn summarize_change(change: &Value) -> String {
    let text = |key: &str| change[key].as_str().unwrap_or("").to_string();
    let event = text("event").to_uppercase();
    let cause = if change["cause"] == "ttl" { " (TTL expiry)" } else { "" };
    match change["record"].as_str().unwrap_or("") {
        "connection" => format!(
            "{event} connection {} of {}/{}{}{cause}",
            text("connection_id"),
            text("tenant"),
            text("user_id"),
            change.get("close_reason").and_then(Value::as_str).map(|r| format!(" ({r})")).unwrap_or_default()
        ),
        "membership" => format!(
            "{event} membership {}/{} of {} ({}){}{cause}",
            text("tenant"),
            text("room"),
            text("connection_id"),
            text("user_id"),
            change.get("left_reason").and_then(Value::as_str).map(|r| format!(", left: {r}")).unwrap_or_default()
        ),
        "message" => format!(
            "{event} message {}/{} by {} ({}): {}",
            text("tenant"),
            text("room"),
            text("user_id"),
            text("connection_id"),
            change["body"]
        ),
        "plugin" => {
            format!("{event} plugin {} version {}", text("tenant"), text("version"))
        }
        "plugin-chunk" => format!("{event} plugin chunk of {}", text("tenant")),
        "plugin-active" => format!("{event} active plugin of {}: {}", text("tenant"), text("version")),
        _ => change.to_string(),
    }
}
