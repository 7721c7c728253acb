//! A message's and a welcome's calls, as every caller runs them — the processor, `roomcast plugin
//! test`, replay and the benchmarks — with the checks around them that are the host's, not the
//! plugin's: the input is checked before any guest code runs, a rewrite or a greeting must fit
//! the frame its recipients get, and routing is narrowed to the tenant's limits.
//!
//! **One fresh instance per message.** Nothing a plugin keeps in its instance — a random seed
//! drawn once (Rust's `HashMap` keys), a counter, a cache — carries from one message to the next,
//! so a message's decision depends only on the record and the plugin: a replay of one record,
//! alone or in another batch, decides as the live run did. A 0.1.0 plugin's `validate` and
//! `route` share the message's instance.

use super::{
    CallReport, ConfigValues, Fault, JoinDecision, JoinRequest, Limits, Message, MessageOutcome, Plugin, PluginHost,
    Routing, Verdict, WelcomeInfo,
};
use roomcast_processor::react::Route;

/// What the plugin did with one message, checked and narrowed: its verdict and route from one
/// `on-message` call (a 0.1.0 plugin's `validate` and `route`, together), or the fault.
/// `InputTooLarge` means it was not called.
#[derive(Debug)]
pub struct MessageCalls {
    pub outcome: (Result<(Verdict, Route), Fault>, CallReport),
}

impl PluginHost {
    /// One message through its plugin on a fresh instance: the input check, the call, the
    /// rewrite's frame check, the reason's bound, and the routing narrowed to the tenant's
    /// limits. Instantiation's cost is in the report.
    pub fn message(&self, plugin: &Plugin, limits: &Limits, message: &Message, record_time_ms: u64) -> MessageCalls {
        self.message_with(plugin, limits, message, record_time_ms, ConfigValues::default())
    }

    /// [`PluginHost::message`] with the tenant's configuration.
    pub fn message_with(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        message: &Message,
        record_time_ms: u64,
        config: ConfigValues,
    ) -> MessageCalls {
        if let Err(too_large) = super::instance::check_input(message, limits) {
            return MessageCalls { outcome: (Err(too_large), CallReport::default()) };
        }
        let (instance, setup) = self.instantiate_with(plugin, limits, config);
        let mut instance = match instance {
            Ok(instance) => instance,
            Err(fault) => return MessageCalls { outcome: (Err(fault), setup) },
        };
        let (outcome, report) = instance.on_message(message, record_time_ms);
        let outcome = outcome.and_then(|MessageOutcome { verdict, routing }| {
            let verdict = match verdict {
                Verdict::Rewrite(text) => {
                    let size = outgoing_size(message, &text);
                    if size > roomcast_processor::protocol::MAX_OUTGOING_BYTES {
                        return Err(Fault::FrameTooLarge {
                            size,
                            limit: roomcast_processor::protocol::MAX_OUTGOING_BYTES,
                        });
                    }
                    Verdict::Rewrite(text)
                }
                Verdict::Reject(reason) => return Ok((Verdict::Reject(bounded_reason(reason)), Route::default())),
                Verdict::Accept => Verdict::Accept,
            };
            Ok((verdict, narrow(routing, &message.room, limits)?))
        });
        MessageCalls { outcome: (outcome, report.after(setup)) }
    }

    /// A welcome's greeting on a fresh instance; one that would not fit the welcome frame is a
    /// fault (the welcome itself always goes out).
    pub fn greet(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        info: &WelcomeInfo,
        record_time_ms: u64,
        config: ConfigValues,
    ) -> (Result<Option<String>, Fault>, CallReport) {
        let (mut greeting, report) = self.welcome(plugin, limits, info, record_time_ms, config);
        if let Ok(Some(text)) = &greeting {
            let welcome = roomcast_processor::protocol::ServerMessage::Welcome {
                connection_id: info.connection_id.clone(),
                tenant: info.tenant.clone(),
                user_id: info.user_id.clone(),
                rooms: info.rooms.clone(),
                greeting: Some(text.clone()),
                // The counts the welcome will carry, at their widest.
                counts: info.rooms.iter().map(|room| (room.clone(), u64::MAX)).collect(),
                // At their widest too: what the handler lets a client name (128 bytes each).
                deployment_id: Some("x".repeat(128)),
                connection_type: Some("x".repeat(128)),
            };
            let size = welcome.to_json().len();
            if size > roomcast_processor::protocol::MAX_OUTGOING_BYTES {
                greeting = Err(Fault::FrameTooLarge { size, limit: roomcast_processor::protocol::MAX_OUTGOING_BYTES });
            }
        }
        (greeting, report)
    }
}

impl PluginHost {
    /// A join's decision on a fresh instance, with the deny reason bounded like a reject's.
    pub fn join(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        request: &JoinRequest,
        record_time_ms: u64,
        config: ConfigValues,
    ) -> (Result<JoinDecision, Fault>, CallReport) {
        let (decision, report) = self.once(plugin, limits, config, |i| i.authorize_join(request, record_time_ms));
        let decision = decision.map(|d| match d {
            JoinDecision::Deny(reason) => JoinDecision::Deny(bounded_reason(reason)),
            allow => allow,
        });
        (decision, report)
    }
}

/// A plugin's reject reason, cut (at a character boundary) to what the sender's `rejected`
/// frame can carry: the sender must hear of the rejection, not get a 413.
pub(crate) fn bounded_reason(reason: String) -> String {
    // 4 KB of the reason, and the ellipsis after it when it was cut.
    super::cut(&reason, 4096 + '…'.len_utf8())
}

/// The frame a recipient gets for `message` with its body rewritten to `text`, in bytes.
fn outgoing_size(message: &Message, text: &str) -> usize {
    let chat = roomcast_processor::protocol::ChatMessage {
        id: message.id.clone(),
        room: message.room.clone(),
        user_id: message.user_id.clone(),
        message: text.to_string(),
        timestamp: message.timestamp.clone(),
    };
    roomcast_processor::protocol::ServerMessage::Message(chat).to_json().len()
}

/// A plugin's routing as the processor applies it: extra rooms without repeats, without the
/// message's own room and without names that are not rooms; users without repeats; each list
/// within the tenant's limits (a longer one is the plugin's fault, not silently cut).
fn narrow(routing: Routing, own_room: &str, limits: &Limits) -> Result<Route, Fault> {
    let mut rooms: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for room in routing.extra_rooms {
        if room != own_room
            && roomcast_processor::model::Name::parse("room", &room).is_ok()
            && seen.insert(room.clone())
        {
            rooms.push(room);
            if rooms.len() > limits.max_extra_rooms {
                return Err(Fault::RoutedTooWide {
                    what: "extra rooms",
                    count: rooms.len(),
                    limit: limits.max_extra_rooms,
                });
            }
        }
    }
    let only_users = match routing.only_users {
        None => None,
        Some(users) => {
            let mut unique: Vec<String> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for user in users {
                if seen.insert(user.clone()) {
                    unique.push(user);
                }
                if unique.len() > limits.max_only_users {
                    return Err(Fault::RoutedTooWide {
                        what: "users",
                        count: unique.len(),
                        limit: limits.max_only_users,
                    });
                }
            }
            Some(unique)
        }
    };
    Ok(Route { extra_rooms: rooms, only_users, echo_to_sender: routing.echo_to_sender })
}
