//! `roomcast plugin …`: upload, list, activate, disable and test tenant plugins, against a
//! DynamoDB table (AWS or any local endpoint) or a running `roomcast dev` (`--dev URL`, which
//! reaches its embedded store through [`crate::dev::api`]).

use std::time::Duration;

use super::{ConfigCommand, PluginCommand};
use crate::dev::api::request;
use crate::model::{FailurePolicy, PluginMeta};
use crate::plugins::{CallReport, JoinRequest, LimitOverrides, Message, PluginHost, WelcomeInfo};
use crate::store::dynamodb::DynamoStore;
use crate::store::{PluginStore, TenantStore};

/// Where a plugin command acts.
pub enum Target {
    Table(DynamoStore),
    /// A running `roomcast dev`'s base URL, e.g. `http://127.0.0.1:8080`.
    Dev(String),
}

impl Target {
    pub async fn upload(
        &self,
        tenant: &str,
        bytes: Vec<u8>,
        policy: FailurePolicy,
        limits: LimitOverrides,
    ) -> anyhow::Result<PluginMeta> {
        match self {
            Target::Table(store) => {
                // A check and one compile: no pool of instance slots to reserve.
                let host = PluginHost::on_demand()?;
                crate::plugins::upload(store, &host, tenant, &bytes, policy, limits, chrono::Utc::now()).await
            }
            Target::Dev(url) => {
                let mut query =
                    vec![format!("policy={}", if policy == FailurePolicy::Closed { "closed" } else { "open" })];
                if let Some(fuel) = limits.fuel {
                    query.push(format!("fuel={fuel}"));
                }
                if let Some(mib) = limits.memory_mib {
                    query.push(format!("memory_mib={mib}"));
                }
                if let Some(ms) = limits.deadline_ms {
                    query.push(format!("deadline_ms={ms}"));
                }
                if let Some(n) = limits.max_extra_rooms {
                    query.push(format!("max_extra_rooms={n}"));
                }
                if let Some(n) = limits.max_only_users {
                    query.push(format!("max_only_users={n}"));
                }
                let path = format!("/_dev/plugins/{tenant}?{}", query.join("&"));
                let answer = request(url, http::Method::POST, &path, bytes).await?;
                Ok(serde_json::from_value(answer)?)
            }
        }
    }

    /// The active version and every uploaded one, oldest first.
    /// The active version (and whether the processor found that it decides joins) and every
    /// uploaded version.
    pub async fn list(&self, tenant: &str) -> anyhow::Result<(Option<(String, bool)>, Vec<PluginMeta>)> {
        match self {
            Target::Table(store) => {
                let active = store.active_plugin(tenant).await?.map(|a| (a.version, a.authorizes_joins == Some(true)));
                Ok((active, store.plugins(tenant).await?))
            }
            Target::Dev(url) => {
                let answer = request(url, http::Method::GET, &format!("/_dev/plugins/{tenant}"), Vec::new()).await?;
                let active = answer["active"]
                    .as_str()
                    .map(|v| (v.to_string(), answer["authorizesJoins"].as_bool() == Some(true)));
                Ok((active, serde_json::from_value(answer["versions"].clone())?))
            }
        }
    }

    /// The tenant's settings (unset: the deployment's defaults).
    pub async fn settings(&self, tenant: &str) -> anyhow::Result<crate::model::TenantSettings> {
        match self {
            Target::Table(store) => {
                Ok(store.tenant_settings(tenant).await?.unwrap_or_else(|| crate::model::TenantSettings::new(tenant)))
            }
            Target::Dev(url) => {
                let path = format!("/_dev/tenants/{tenant}/settings");
                Ok(serde_json::from_value(request(url, http::Method::GET, &path, Vec::new()).await?)?)
            }
        }
    }

    /// The tenant's own identity (a default, empty one when it has none).
    pub async fn identity(&self, tenant: &str) -> anyhow::Result<crate::identity::TenantIdentity> {
        crate::model::Name::parse("tenant", tenant).map_err(anyhow::Error::msg)?;
        match self {
            Target::Table(store) => {
                Ok(store.tenant_identity(tenant).await?.unwrap_or_else(|| crate::identity::TenantIdentity::new(tenant)))
            }
            Target::Dev(url) => {
                let path = format!("/_dev/tenants/{tenant}/identity");
                Ok(serde_json::from_value(request(url, http::Method::GET, &path, Vec::new()).await?)?)
            }
        }
    }

    /// Writes the tenant's identity; authorizers read it within 30 s.
    pub async fn set_identity(&self, identity: &crate::identity::TenantIdentity) -> anyhow::Result<()> {
        crate::model::Name::parse("tenant", &identity.tenant).map_err(anyhow::Error::msg)?;
        identity.check().map_err(anyhow::Error::msg)?;
        match self {
            Target::Table(store) => Ok(store.put_tenant_identity(identity).await?),
            Target::Dev(url) => {
                let path = format!("/_dev/tenants/{}/identity", identity.tenant);
                request(url, http::Method::PUT, &path, serde_json::to_vec(identity)?).await.map(|_| ())
            }
        }
    }

    /// Writes the tenant's settings; the processor reads them from its next batch on.
    pub async fn set_settings(&self, settings: &crate::model::TenantSettings) -> anyhow::Result<()> {
        crate::model::Name::parse("tenant", &settings.tenant).map_err(anyhow::Error::msg)?;
        match self {
            Target::Table(store) => Ok(store.put_tenant_settings(settings).await?),
            Target::Dev(url) => {
                let path = format!("/_dev/tenants/{}/settings", settings.tenant);
                let body = serde_json::to_vec(&serde_json::json!({
                    "presenceAnnounceMaxUsers": settings.presence_announce_max_users,
                    "rateLimits": settings.rate_limits,
                    "latestOnJoin": settings.latest_on_join,
                    "webhook": settings.webhook,
                }))?;
                request(url, http::Method::PUT, &path, body).await.map(|_| ())
            }
        }
    }

    /// The tenant's plugin configuration.
    pub async fn config(&self, tenant: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        crate::model::Name::parse("tenant", tenant).map_err(anyhow::Error::msg)?;
        match self {
            Target::Table(store) => Ok(store.plugin_config(tenant).await?.map(|c| c.values).unwrap_or_default()),
            Target::Dev(url) => {
                let answer =
                    request(url, http::Method::GET, &format!("/_dev/tenants/{tenant}/config"), Vec::new()).await?;
                Ok(serde_json::from_value(answer)?)
            }
        }
    }

    /// Replaces the tenant's plugin configuration (checked against its bounds first); every
    /// processor reads it from its next batch on.
    pub async fn set_config(
        &self,
        tenant: &str,
        values: std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        crate::model::Name::parse("tenant", tenant).map_err(anyhow::Error::msg)?;
        let config = crate::model::PluginConfig::new(tenant, values, chrono::Utc::now()).map_err(anyhow::Error::msg)?;
        match self {
            Target::Table(store) => {
                store.put_plugin_config(&config).await?;
                Ok(config.values)
            }
            Target::Dev(url) => {
                let path = format!("/_dev/tenants/{tenant}/config");
                let answer = request(url, http::Method::PUT, &path, serde_json::to_vec(&config.values)?).await?;
                Ok(serde_json::from_value(answer)?)
            }
        }
    }

    /// Points the tenant at `version`, or at no plugin.
    pub async fn set_active(&self, tenant: &str, version: Option<&str>) -> anyhow::Result<()> {
        match self {
            Target::Table(store) => {
                if let Some(version) = version
                    && !store.plugins(tenant).await?.iter().any(|m| m.version == version)
                {
                    anyhow::bail!("{tenant} has no uploaded version {version}");
                }
                Ok(store.set_active_plugin(tenant, version).await?)
            }
            Target::Dev(url) => {
                let body = serde_json::to_vec(&serde_json::json!({ "version": version }))?;
                request(url, http::Method::PUT, &format!("/_dev/plugins/{tenant}/active"), body).await.map(|_| ())
            }
        }
    }
}

/// `roomcast plugin list`'s lines.
pub fn print_list(active: Option<(&str, bool)>, versions: &[PluginMeta]) {
    for meta in versions {
        let is_active = active.is_some_and(|(v, _)| v == meta.version);
        let marker = if is_active { "*" } else { " " };
        let joins = if is_active && active.is_some_and(|(_, joins)| joins) { "  decides joins" } else { "" };
        // The pointer is the truth: a version still marked active that the pointer does not name
        // (after a disable, or a rollback the processor has not recorded yet) is not running.
        let status = match meta.status {
            crate::model::PluginStatus::Active if !is_active => {
                serde_json::to_value(crate::model::PluginStatus::Inactive).ok()
            }
            status => serde_json::to_value(status).ok(),
        };
        let limits = meta.limits.map(|l| format!("  limits {}", serde_json::to_string(&l).unwrap_or_default()));
        println!(
            "{marker} {}  {:<8}  {:>8} bytes  uploaded {}{}{}{joins}",
            meta.version,
            status.as_ref().and_then(|s| s.as_str()).unwrap_or("?"),
            meta.size,
            crate::model::format_ts(&meta.uploaded_at),
            limits.unwrap_or_default(),
            meta.reason.as_ref().map(|r| format!("  ({r})")).unwrap_or_default()
        );
    }
}

/// Reads a configuration file for `plugin test` and `replay`: a JSON object of strings, within
/// the bounds a tenant's configuration has in the table.
pub fn read_config(path: &std::path::Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let values: std::collections::BTreeMap<String, String> = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("{} must be a JSON object of strings: {e}", path.display()))?;
    crate::model::PluginConfig::new("file", values.clone(), chrono::Utc::now())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(values)
}

/// `KEY=VALUE` arguments as a map.
pub fn parse_pairs(pairs: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("{pair:?} is not KEY=VALUE"))
        })
        .collect()
}

/// `roomcast plugin test`: true when every hook ran without a fault.
pub fn test(
    file: &std::path::Path,
    event: &std::path::Path,
    limits: &crate::plugins::Limits,
    config: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<bool> {
    let bytes = crate::plugins::read_component(file)?;
    let event: serde_json::Value =
        serde_json::from_slice(&std::fs::read(event).map_err(|e| anyhow::anyhow!("reading {}: {e}", event.display()))?)
            .map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", event.display()))?;
    // One message, one instance: no pool of slots to reserve.
    let host = PluginHost::on_demand()?;
    let plugin = host.compile(&bytes, limits).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let hooks = host.hooks(&plugin, limits);
    println!(
        "plugin   {}  sha256 {}  {} bytes  world {}  hooks {hooks:?}",
        file.display(),
        plugin.sha256,
        plugin.size,
        plugin.world()
    );
    let config = std::sync::Arc::new(config);
    let time = event["time"].as_u64().unwrap_or(0);
    let text = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
    let show = |hook: &str, outcome: String, report: &CallReport| {
        println!("{hook:<14} {outcome}");
        println!("               fuel {}  time {:.3} ms", report.fuel_used, report.elapsed.as_secs_f64() * 1000.0);
        for line in &report.log {
            println!("               log  {line}");
        }
    };
    let describe = |r: Result<String, crate::plugins::Fault>| r.unwrap_or_else(|f| format!("FAULT {f}"));
    let clean;
    if let Some(m) = event.get("message") {
        let message = Message {
            id: text(m, "id"),
            tenant: text(m, "tenant"),
            room: text(m, "room"),
            user_id: text(m, "user_id"),
            body: text(m, "body"),
            timestamp: text(m, "timestamp"),
        };
        // As the processor runs it: one fresh instance, the input and frame checks, routing
        // narrowed to the tenant's limits.
        let (outcome, report) = host.message_with(&plugin, limits, &message, time, config).outcome;
        clean = outcome.is_ok();
        let hook = if plugin.world() == "0.1.0" { "validate+route" } else { "on-message" };
        let plain = crate::react::Route::default();
        let described = outcome.map(|(v, r)| if r == plain { format!("{v:?}") } else { format!("{v:?} {r:?}") });
        show(hook, describe(described), &report);
    } else if let Some(j) = event.get("join") {
        let request = JoinRequest {
            connection_id: text(j, "connection_id"),
            tenant: text(j, "tenant"),
            user_id: text(j, "user_id"),
            room: text(j, "room"),
            claims: j["claims"]
                .as_object()
                .map(|c| {
                    c.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                        .collect()
                })
                .unwrap_or_default(),
        };
        if !hooks.contains(crate::plugins::Hooks::AUTHORIZE_JOIN) {
            println!("authorize-join not implemented (the plugin's hooks do not name it): every join is allowed");
            return Ok(true);
        }
        let (decision, report) = host.join(&plugin, limits, &request, time, config);
        clean = decision.is_ok();
        show("authorize-join", describe(decision.map(|d| format!("{d:?}"))), &report);
    } else if let Some(w) = event.get("welcome") {
        let info = WelcomeInfo {
            connection_id: text(w, "connection_id"),
            tenant: text(w, "tenant"),
            user_id: text(w, "user_id"),
            rooms: w["rooms"]
                .as_array()
                .map(|r| r.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
        };
        let (greeting, report) = host.greet(&plugin, limits, &info, time, config);
        clean = greeting.is_ok();
        show("welcome", describe(greeting.map(|g| format!("{g:?}"))), &report);
    } else {
        anyhow::bail!("the event needs a \"message\", a \"join\" or a \"welcome\" object");
    }
    Ok(clean)
}

/// `roomcast plugin …`.
pub(super) async fn run(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Upload {
            tenant,
            file,
            policy,
            fuel,
            memory_mib,
            deadline_ms,
            max_extra_rooms,
            max_only_users,
            target,
        } => {
            let bytes = crate::plugins::read_component(&file)?;
            let policy = if policy == "closed" {
                crate::model::FailurePolicy::Closed
            } else {
                crate::model::FailurePolicy::Open
            };
            let limits = crate::plugins::LimitOverrides {
                fuel,
                memory_mib,
                deadline_ms,
                max_extra_rooms,
                max_only_users,
                ..Default::default()
            };
            let meta = target
                .target()
                .await
                .upload(&tenant, bytes, policy, limits)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", file.display()))?;
            println!(
                "uploaded {tenant} version {} ({} bytes, {} chunks, sha256 {})",
                meta.version, meta.size, meta.chunks, meta.sha256
            );
            println!("the processor activates it; `roomcast plugin list --tenant {tenant}` shows the outcome");
            Ok(())
        }
        PluginCommand::List { tenant, target } => {
            let (active, versions) = target.target().await.list(&tenant).await?;
            // Said on stderr: the listing on stdout stays one line a version, for scripts.
            if versions.is_empty() {
                eprintln!(
                    "{tenant} has no plugin versions (`roomcast plugin upload --tenant {tenant} FILE.wasm` adds one)"
                );
            } else if active.is_none() {
                eprintln!("{tenant} runs no plugin (none active, or disabled); its versions:");
            }
            print_list(active.as_ref().map(|(v, joins)| (v.as_str(), *joins)), &versions);
            Ok(())
        }
        PluginCommand::Activate { tenant, version, target } => {
            target.target().await.set_active(&tenant, Some(&version)).await?;
            println!("{tenant} now runs version {version}");
            Ok(())
        }
        PluginCommand::Disable { tenant, target } => {
            target.target().await.set_active(&tenant, None).await?;
            println!("{tenant} runs without a plugin");
            Ok(())
        }
        PluginCommand::Config { command } => match command {
            ConfigCommand::Set { tenant, pairs, target } => {
                let target = target.target().await;
                let mut values = target.config(&tenant).await?;
                values.extend(parse_pairs(&pairs)?);
                println!("{}", serde_json::to_string_pretty(&target.set_config(&tenant, values).await?)?);
                Ok(())
            }
            ConfigCommand::Get { tenant, key, target } => {
                let values = target.target().await.config(&tenant).await?;
                match key {
                    Some(key) => match values.get(&key) {
                        Some(value) => println!("{value}"),
                        None => anyhow::bail!("{tenant} has no configuration key {key:?}"),
                    },
                    None => println!("{}", serde_json::to_string_pretty(&values)?),
                }
                Ok(())
            }
            ConfigCommand::Unset { tenant, keys, target } => {
                let target = target.target().await;
                let mut values = target.config(&tenant).await?;
                for key in &keys {
                    values.remove(key);
                }
                println!("{}", serde_json::to_string_pretty(&target.set_config(&tenant, values).await?)?);
                Ok(())
            }
        },
        PluginCommand::New { name, dir, sdk_path } => {
            let written = crate::cli::scaffold::new_plugin(&name, &dir, sdk_path.as_deref())?;
            println!("wrote {}", written.display());
            Ok(())
        }
        PluginCommand::Test { file, event, config, fuel, deadline_ms, memory_mib } => {
            let config = config.as_deref().map(read_config).transpose()?.unwrap_or_default();
            let limits = crate::plugins::Limits {
                fuel,
                deadline: Duration::from_millis(deadline_ms),
                memory_bytes: memory_mib << 20,
                ..crate::plugins::Limits::default()
            };
            // The plugin host blocks its caller's thread while guest code runs: not this
            // runtime's worker.
            let clean = tokio::task::spawn_blocking(move || test(&file, &event, &limits, config))
                .await
                .map_err(|e| anyhow::anyhow!("the plugin test did not complete: {e}"))??;
            if clean { Ok(()) } else { anyhow::bail!("the plugin faulted") }
        }
    }
}
