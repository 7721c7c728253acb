//! Which plugin each tenant runs, with its limits, failure policy and circuit breaker, and the
//! calls the processor makes: [`Registry::decide_message`] and [`Registry::greeting`].
//!
//! Blame stays with the tenant: a fault applies the tenant's [`Policy`] (fail open to the default
//! rules, or fail closed and reject), is counted, and after [`BREAKER_THRESHOLD`] faults in a row
//! opens the breaker: the plugin is skipped (policy applied) for [`BREAKER_COOLDOWN`]. Nothing
//! here ever fails a batch or touches another tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{CallReport, Fault, Limits, Message, Plugin, PluginHost, Verdict, WelcomeInfo};
use crate::metrics::Metrics;
use crate::react::{Decision, Route};

pub const BREAKER_THRESHOLD: u32 = 5;
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);

/// What to do when a tenant's plugin faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Deliver by the default rules, as if there were no plugin.
    FailOpen,
    /// Reject the message (its sender is told).
    FailClosed,
}

#[derive(Debug, Default)]
struct Breaker {
    faults_in_a_row: u32,
    open_until: Option<Instant>,
}

struct Installed {
    version: String,
    plugin: Plugin,
    limits: Limits,
    policy: Policy,
    breaker: Mutex<Breaker>,
}

/// One plugin call as it happened, for logs and replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    pub hook: &'static str,
    pub outcome: String,
    pub report: CallReport,
}

pub struct Registry {
    host: Arc<PluginHost>,
    limits: Limits,
    tenants: RwLock<HashMap<String, Arc<Installed>>>,
    /// Tenants looked up in the table recently and found without a plugin.
    absent: Mutex<HashMap<String, Instant>>,
    metrics: Arc<Metrics>,
}

/// How long "this tenant has no plugin" is believed before the table is asked again.
pub const ABSENT_FOR: Duration = Duration::from_secs(30);

impl Registry {
    pub fn new(host: Arc<PluginHost>, metrics: Arc<Metrics>) -> Registry {
        Registry {
            host,
            limits: Limits::default(),
            tenants: RwLock::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The limits plugins loaded from the table run with (the deployment's configuration).
    pub fn with_limits(mut self, limits: Limits) -> Registry {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn host(&self) -> &Arc<PluginHost> {
        &self.host
    }

    /// Makes `plugin` the tenant's active plugin (replacing any other).
    pub fn install(&self, tenant: &str, plugin: Plugin, limits: Limits, policy: Policy) {
        let version = plugin.sha256[..16.min(plugin.sha256.len())].to_string();
        let installed =
            Arc::new(Installed { version, plugin, limits, policy, breaker: Mutex::new(Breaker::default()) });
        self.tenants.write().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_string(), installed);
        self.absent.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
    }

    /// The tenant runs no plugin (until the table says otherwise).
    pub fn remove(&self, tenant: &str) {
        self.tenants.write().unwrap_or_else(|p| p.into_inner()).remove(tenant);
        self.absent.lock().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_string(), Instant::now());
    }

    /// The version the tenant runs here, if any.
    pub fn installed_version(&self, tenant: &str) -> Option<String> {
        self.get(tenant).map(|i| i.version.clone())
    }

    /// Whether the table should be asked for this tenant's plugin (a cold container, or a
    /// "none" older than [`ABSENT_FOR`]).
    pub fn should_look_up(&self, tenant: &str) -> bool {
        if self.get(tenant).is_some() {
            return false;
        }
        let absent = self.absent.lock().unwrap_or_else(|p| p.into_inner());
        absent.get(tenant).is_none_or(|at| at.elapsed() > ABSENT_FOR)
    }

    fn get(&self, tenant: &str) -> Option<Arc<Installed>> {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).get(tenant).cloned()
    }

    /// Runs a hook on a blocking thread (a call may take up to its deadline), with the breaker.
    async fn run<R: Send + 'static>(
        &self,
        tenant: &str,
        hook: &'static str,
        call: impl FnOnce(&PluginHost, &Plugin, &Limits) -> (Result<R, Fault>, CallReport) + Send + 'static,
    ) -> Option<(Result<R, Fault>, CallReport, Policy)> {
        let installed = self.get(tenant)?;
        {
            let breaker = installed.breaker.lock().unwrap_or_else(|p| p.into_inner());
            if breaker.open_until.is_some_and(|until| Instant::now() < until) {
                tracing::warn!(tenant, hook, "plugin breaker open: applying the failure policy without calling it");
                return Some((
                    Err(Fault::Trap("circuit breaker open after repeated faults".into())),
                    CallReport::default(),
                    installed.policy,
                ));
            }
        }
        let host = self.host.clone();
        let running = installed.clone();
        let joined = tokio::task::spawn_blocking(move || call(&host, &running.plugin, &running.limits)).await;
        let (result, report) = match joined {
            Ok(done) => done,
            Err(e) => (Err(Fault::Trap(format!("the plugin call did not complete: {e}"))), CallReport::default()),
        };
        let mut breaker = installed.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) => *breaker = Breaker::default(),
            Err(fault) => {
                Metrics::add(&self.metrics.plugin_faults, 1);
                breaker.faults_in_a_row += 1;
                tracing::warn!(tenant, hook, %fault, faults_in_a_row = breaker.faults_in_a_row, "plugin fault");
                if breaker.faults_in_a_row >= BREAKER_THRESHOLD {
                    breaker.open_until = Some(Instant::now() + BREAKER_COOLDOWN);
                }
            }
        }
        tracing::debug!(
            tenant,
            hook,
            fuel = report.fuel_used,
            elapsed_us = report.elapsed.as_micros() as u64,
            "plugin call"
        );
        Some((result, report, installed.policy))
    }

    /// Validation then routing for one message; `None` when the tenant has no plugin.
    pub async fn decide_message(
        &self,
        message: &Message,
        record_time_ms: u64,
    ) -> Option<(Decision, Route, Vec<CallRecord>)> {
        let tenant = message.tenant.clone();
        let mut calls = Vec::new();
        let input = message.clone();
        let (result, report, policy) =
            self.run(&tenant, "validate", move |h, p, l| h.validate(p, l, &input, record_time_ms)).await?;
        let outcome = describe(&result);
        let decision = match result {
            Ok(Verdict::Accept) => Decision::Deliver { rewritten: None },
            Ok(Verdict::Rewrite(text)) => Decision::Deliver { rewritten: Some(text) },
            Ok(Verdict::Reject(reason)) => Decision::Reject { reason },
            Err(ref fault) => match policy {
                Policy::FailOpen => Decision::Deliver { rewritten: None },
                Policy::FailClosed => {
                    Decision::Reject { reason: format!("the room's rules could not be checked ({fault})") }
                }
            },
        };
        calls.push(CallRecord { hook: "validate", outcome, report });
        if let Decision::Reject { .. } = decision {
            Metrics::add(&self.metrics.rejected, 1);
            return Some((decision, Route::default(), calls));
        }
        let input = message.clone();
        let route = match self.run(&tenant, "route", move |h, p, l| h.route(p, l, &input, record_time_ms)).await {
            Some((result, report, _)) => {
                calls.push(CallRecord { hook: "route", outcome: describe(&result), report });
                match result {
                    Ok(r) => {
                        Route { extra_rooms: r.extra_rooms, only_users: r.only_users, echo_to_sender: r.echo_to_sender }
                    }
                    Err(_) => Route::default(), // routing faults fall back to the room's members
                }
            }
            None => Route::default(),
        };
        Some((decision, route, calls))
    }

    /// The tenant plugin's greeting for a welcome, if any.
    pub async fn greeting(&self, info: &WelcomeInfo, record_time_ms: u64) -> Option<(Option<String>, CallRecord)> {
        let input = info.clone();
        let (result, report, _) =
            self.run(&info.tenant, "welcome", move |h, p, l| h.welcome(p, l, &input, record_time_ms)).await?;
        let record = CallRecord { hook: "welcome", outcome: describe(&result), report };
        Some((result.unwrap_or(None), record))
    }
}

fn describe<T: std::fmt::Debug>(result: &Result<T, Fault>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(fault) => format!("fault: {fault}"),
    }
}
