//! # The Roomcast plugin SDK
//!
//! A tenant plugin is a type implementing [`Plugin`], exported with [`export!`], built for
//! `wasm32-wasip2`:
//!
//! ```
//! use roomcast_plugin_sdk::{Message, Outcome, Plugin};
//!
//! struct NoShouting;
//!
//! impl Plugin for NoShouting {
//!     fn on_message(message: &Message) -> Outcome {
//!         if message.body.chars().any(char::is_lowercase) { Outcome::accept() } else { Outcome::reject("no shouting") }
//!     }
//! }
//!
//! // In the plugin crate: roomcast_plugin_sdk::export!(NoShouting);
//! assert_eq!(NoShouting::on_message(&Message::new("general", "ann", "HELLO")), Outcome::reject("no shouting"));
//! ```
//!
//! The SDK hides the WIT bindings (`wit/roomcast-plugin.wit`, `roomcast:plugin@0.2.0`): the
//! hooks take and return plain Rust values, and [`config`], [`log`] and [`record_time`] reach
//! the host. Outside WebAssembly (a plugin's unit tests) they use [`testing`]'s values instead,
//! so a plugin is tested with `cargo test` like any Rust code. `roomcast plugin new NAME` writes
//! a ready crate.

/// A chat message on its way to a room.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// Unique and time-ordered.
    pub id: String,
    pub tenant: String,
    pub room: String,
    /// The sender, as the `$connect` authorizer identified them.
    pub user_id: String,
    /// The text as the sender wrote it.
    pub body: String,
    /// RFC 3339, UTC, milliseconds.
    pub timestamp: String,
}

impl Message {
    /// A message for tests: `body` by `user_id` in `room` of tenant `acme`.
    pub fn new(room: &str, user_id: &str, body: &str) -> Message {
        Message {
            id: "01890000-0000-7000-8000-000000000000".into(),
            tenant: "acme".into(),
            room: room.into(),
            user_id: user_id.into(),
            body: body.into(),
            timestamp: "2026-01-01T00:00:00.000Z".into(),
        }
    }
}

/// What becomes of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it as it is.
    Accept,
    /// Deliver this text instead.
    Rewrite(String),
    /// Do not deliver it; the sender is told this reason.
    Reject(String),
}

/// Who receives an accepted message, beyond its room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    /// Also deliver to the members of these rooms (same tenant).
    pub extra_rooms: Vec<String>,
    /// When set, deliver only to these users among the recipients.
    pub only_users: Option<Vec<String>>,
    /// False: not back to the sender's connections.
    pub echo_to_sender: bool,
}

impl Default for Routing {
    fn default() -> Self {
        Routing { extra_rooms: Vec::new(), only_users: None, echo_to_sender: true }
    }
}

/// A message's verdict and routing: what [`Plugin::on_message`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub routing: Routing,
}

impl Outcome {
    /// Deliver as it is, to the room.
    pub fn accept() -> Outcome {
        Outcome { verdict: Verdict::Accept, routing: Routing::default() }
    }

    /// Deliver `text` instead, to the room.
    pub fn rewrite(text: impl Into<String>) -> Outcome {
        Outcome { verdict: Verdict::Rewrite(text.into()), routing: Routing::default() }
    }

    /// Do not deliver; the sender is told `reason`.
    pub fn reject(reason: impl Into<String>) -> Outcome {
        Outcome { verdict: Verdict::Reject(reason.into()), routing: Routing::default() }
    }

    /// This outcome with `routing`.
    pub fn routed(mut self, routing: Routing) -> Outcome {
        self.routing = routing;
        self
    }
}

/// A connection asking to join a room.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JoinRequest {
    pub connection_id: String,
    pub tenant: String,
    pub user_id: String,
    pub room: String,
    /// The token's claims the authorizer passed on, as name and value.
    pub claims: Vec<(String, String)>,
}

impl JoinRequest {
    /// A join for tests: `user_id` into `room` of tenant `acme`, no claims.
    pub fn new(room: &str, user_id: &str) -> JoinRequest {
        JoinRequest {
            connection_id: "conn-1".into(),
            tenant: "acme".into(),
            user_id: user_id.into(),
            room: room.into(),
            claims: Vec::new(),
        }
    }

    /// A claim's value, if the token had it.
    pub fn claim(&self, name: &str) -> Option<&str> {
        self.claims.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Whether a connection may join a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Join {
    Allow,
    /// The client gets `join_denied` with this reason.
    Deny(String),
}

/// The connection being welcomed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WelcomeInfo {
    pub connection_id: String,
    pub tenant: String,
    pub user_id: String,
    pub rooms: Vec<String>,
}

/// How loud a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// A tenant plugin. Every hook has a default: a plugin implements only what it decides.
///
/// Each call runs on a fresh instance: nothing carries from one call to the next. Keep state in
/// configuration ([`config`]), not in statics.
pub trait Plugin {
    /// Set to `true` when implementing [`Plugin::authorize_join`]: otherwise the host never calls
    /// it, and the tenant's joins cost nothing.
    const AUTHORIZES_JOINS: bool = false;
    /// Set to `true` when implementing [`Plugin::welcome`].
    const WELCOMES: bool = false;

    /// A message's verdict and routing, in one call. Default: accept, to the room.
    fn on_message(message: &Message) -> Outcome {
        let _ = message;
        Outcome::accept()
    }

    /// Whether a connection may join a room. Default: allow.
    fn authorize_join(request: &JoinRequest) -> Join {
        let _ = request;
        Join::Allow
    }

    /// A line added to the welcome, or none. Default: none.
    fn welcome(info: &WelcomeInfo) -> Option<String> {
        let _ = info;
        None
    }
}

/// The tenant's configuration value for `key` (`roomcast plugin config set`), or none.
pub fn config(key: &str) -> Option<String> {
    imp::config(key)
}

/// Appends a line to this call's log: the processor emits it tagged with the tenant, the plugin
/// version, the hook and the record's sequence number.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// The time of the record being decided on, in milliseconds since the Unix epoch (never the
/// wall clock: replays decide the same).
pub fn record_time() -> u64 {
    imp::record_time()
}

/// What [`config`], [`log`] and [`record_time`] see in a plugin's unit tests (outside
/// WebAssembly), per test thread.
pub mod testing {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        pub(crate) static CONFIG: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
        pub(crate) static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
        pub(crate) static TIME: RefCell<u64> = const { RefCell::new(0) };
    }

    /// Sets this thread's configuration (`KEY=VALUE` pairs).
    pub fn set_config<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
        CONFIG.with(|c| *c.borrow_mut() = pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    }

    /// Sets the record time [`crate::record_time`] returns.
    pub fn set_record_time(ms: u64) {
        TIME.with(|t| *t.borrow_mut() = ms);
    }

    /// Takes the lines logged on this thread so far (`"info: …"`).
    pub fn take_log() -> Vec<String> {
        LOG.with(|l| std::mem::take(&mut *l.borrow_mut()))
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::{Level, testing};

    fn level_name(level: Level) -> &'static str {
        match level {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    pub fn config(key: &str) -> Option<String> {
        testing::CONFIG.with(|c| c.borrow().get(key).cloned())
    }

    pub fn log(level: Level, message: &str) {
        testing::LOG.with(|l| l.borrow_mut().push(format!("{}: {message}", level_name(level))));
    }

    pub fn record_time() -> u64 {
        testing::TIME.with(|t| *t.borrow())
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Level;
    use crate::bindings::roomcast::plugin::host;

    pub fn config(key: &str) -> Option<String> {
        host::config(key)
    }

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Debug => host::Level::Debug,
            Level::Info => host::Level::Info,
            Level::Warn => host::Level::Warn,
            Level::Error => host::Level::Error,
        };
        host::log(level, message)
    }

    pub fn record_time() -> u64 {
        host::record_time()
    }
}

/// The WIT bindings (`roomcast:plugin@0.2.0`), for [`export!`]; plugins do not use them.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments, reason = "in the code wit-bindgen generates")]
pub mod bindings {
    wit_bindgen::generate!({
        world: "tenant-plugin",
        // The crate's own copy of `wit/roomcast-plugin.wit` (a test keeps them equal), so the
        // crate builds wherever it is copied or published.
        path: "wit/roomcast-plugin.wit",
        pub_export_macro: true,
        export_macro_name: "__export_bindings",
        default_bindings_module: "roomcast_plugin_sdk::bindings",
    });
}

/// Conversions between the bindings and the SDK's values, for [`export!`].
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod adapt {
    use crate::bindings::roomcast::plugin::types as t;

    pub fn message(m: t::Message) -> super::Message {
        super::Message {
            id: m.id,
            tenant: m.tenant,
            room: m.room,
            user_id: m.user_id,
            body: m.body,
            timestamp: m.timestamp,
        }
    }

    pub fn outcome(o: super::Outcome) -> t::MessageOutcome {
        t::MessageOutcome {
            verdict: match o.verdict {
                super::Verdict::Accept => t::Verdict::Accept,
                super::Verdict::Rewrite(text) => t::Verdict::Rewrite(text),
                super::Verdict::Reject(why) => t::Verdict::Reject(why),
            },
            routing: t::Routing {
                extra_rooms: o.routing.extra_rooms,
                only_users: o.routing.only_users,
                echo_to_sender: o.routing.echo_to_sender,
            },
        }
    }

    pub fn join_request(r: t::JoinRequest) -> super::JoinRequest {
        super::JoinRequest {
            connection_id: r.connection_id,
            tenant: r.tenant,
            user_id: r.user_id,
            room: r.room,
            claims: r.claims,
        }
    }

    pub fn join(j: super::Join) -> t::JoinDecision {
        match j {
            super::Join::Allow => t::JoinDecision::Allow,
            super::Join::Deny(why) => t::JoinDecision::Deny(why),
        }
    }

    pub fn welcome(w: t::WelcomeInfo) -> super::WelcomeInfo {
        super::WelcomeInfo { connection_id: w.connection_id, tenant: w.tenant, user_id: w.user_id, rooms: w.rooms }
    }

    pub fn hooks(authorizes_joins: bool, welcomes: bool) -> t::Hooks {
        let mut hooks = t::Hooks::empty();
        if authorizes_joins {
            hooks |= t::Hooks::AUTHORIZE_JOIN;
        }
        if welcomes {
            hooks |= t::Hooks::WELCOME;
        }
        hooks
    }
}

/// Exports a [`Plugin`] as the component's `roomcast:plugin/tenant-plugin@0.2.0`. Outside
/// WebAssembly it expands to nothing, so the crate's unit tests build natively.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::roomcast::plugin::types as t;

            struct Exported;

            impl $crate::bindings::Guest for Exported {
                fn hooks() -> t::Hooks {
                    $crate::adapt::hooks(
                        <$plugin as $crate::Plugin>::AUTHORIZES_JOINS,
                        <$plugin as $crate::Plugin>::WELCOMES,
                    )
                }
                fn on_message(message: t::Message) -> t::MessageOutcome {
                    $crate::adapt::outcome(<$plugin as $crate::Plugin>::on_message(&$crate::adapt::message(message)))
                }
                fn authorize_join(request: t::JoinRequest) -> t::JoinDecision {
                    $crate::adapt::join(<$plugin as $crate::Plugin>::authorize_join(&$crate::adapt::join_request(
                        request,
                    )))
                }
                fn welcome(info: t::WelcomeInfo) -> Option<String> {
                    <$plugin as $crate::Plugin>::welcome(&$crate::adapt::welcome(info))
                }
            }

    $crate::bindings::__export_bindings!(Exported with_types_in $crate::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl Plugin for Quiet {}

    #[test]
    fn hooks_default_to_accepting_allowing_and_not_greeting() {
        assert_eq!(Quiet::on_message(&Message::new("general", "ann", "hi")), Outcome::accept());
        assert_eq!(Quiet::authorize_join(&JoinRequest::new("general", "ann")), Join::Allow);
        assert_eq!(Quiet::welcome(&WelcomeInfo::default()), None);
        const { assert!(!Quiet::AUTHORIZES_JOINS && !Quiet::WELCOMES) };
    }

    #[test]
    fn the_crates_world_is_the_repositorys() {
        assert_eq!(
            include_str!("../wit/roomcast-plugin.wit"),
            include_str!("../../../wit/roomcast-plugin.wit"),
            "copy wit/roomcast-plugin.wit to plugins/sdk/wit/"
        );
    }

    #[test]
    fn config_log_and_time_come_from_the_test_thread() {
        testing::set_config([("banned", "spam")]);
        testing::set_record_time(42);
        log(Level::Info, "hello");
        assert_eq!((config("banned").as_deref(), config("other"), record_time()), (Some("spam"), None, 42));
        assert_eq!(testing::take_log(), vec!["info: hello".to_string()]);
        let join = JoinRequest { claims: vec![("plan".into(), "pro".into())], ..JoinRequest::new("r", "u") };
        assert_eq!((join.claim("plan"), join.claim("x")), (Some("pro"), None));
    }
}
