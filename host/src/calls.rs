//! A message's and a welcome's calls, as every caller runs them — the processor, `roomcast plugin
//! test`, replay and the benchmarks — with the checks around them that are the host's, not the
//! plugin's: the input is checked before any guest code runs, a rewrite or a greeting must fit
//! the frame its recipients get, and routing is narrowed to the tenant's limits.
//!
//! **One fresh instance per message.** Nothing a plugin keeps in its instance — a random seed
//! drawn once (Rust's `HashMap` keys), a counter, a cache — carries from one message to the next,
//! so a message's decision depends only on the record and the plugin: a replay of one record,
//! alone or in another batch, decides as the live run did. A message's `validate` and `route`
//! share its instance.

use super::{CallReport, Fault, Limits, Message, Plugin, PluginHost, Routing, Verdict, WelcomeInfo};
use crate::react::Route;

/// What the plugin's hooks did with one message, checked and narrowed.
#[derive(Debug)]
pub struct MessageCalls {
    /// `validate`: its verdict, or why there is none (`InputTooLarge` means it was not called).
    pub validate: (Result<Verdict, Fault>, CallReport),
    /// `route`, when `validate` accepted or rewrote: the narrowed route, or the fault.
    pub route: Option<(Result<Route, Fault>, CallReport)>,
}

impl PluginHost {
    /// One message through its plugin on a fresh instance: the input check, `validate`, the
    /// rewrite's frame check, and — unless the message was rejected or the plugin faulted —
    /// `route`, narrowed. Instantiation's cost is in `validate`'s report.
    pub fn message(&self, plugin: &Plugin, limits: &Limits, message: &Message, record_time_ms: u64) -> MessageCalls {
        if let Err(too_large) = super::instance::check_input(message, limits) {
            return MessageCalls { validate: (Err(too_large), CallReport::default()), route: None };
        }
        let (instance, setup) = self.instantiate(plugin, limits);
        let mut instance = match instance {
            Ok(instance) => instance,
            Err(fault) => return MessageCalls { validate: (Err(fault), setup), route: None },
        };
        let (mut verdict, report) = instance.validate(message, record_time_ms);
        if let Ok(Verdict::Rewrite(text)) = &verdict {
            let size = outgoing_size(message, text);
            if size > crate::protocol::MAX_OUTGOING_BYTES {
                verdict = Err(Fault::FrameTooLarge { size, limit: crate::protocol::MAX_OUTGOING_BYTES });
            }
        }
        if let Ok(Verdict::Reject(reason)) = verdict {
            verdict = Ok(Verdict::Reject(bounded_reason(reason)));
        }
        let validate = (verdict, report.after(setup));
        let route = match &validate.0 {
            Ok(Verdict::Accept | Verdict::Rewrite(_)) => {
                let (routing, report) = instance.route(message, record_time_ms);
                Some((routing.and_then(|r| narrow(r, &message.room, limits)), report))
            }
            _ => None,
        };
        MessageCalls { validate, route }
    }

    /// A welcome's greeting on a fresh instance; one that would not fit the welcome frame is a
    /// fault (the welcome itself always goes out).
    pub fn greet(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        info: &WelcomeInfo,
        record_time_ms: u64,
    ) -> (Result<Option<String>, Fault>, CallReport) {
        let (mut greeting, report) = self.welcome(plugin, limits, info, record_time_ms);
        if let Ok(Some(text)) = &greeting {
            let welcome = crate::protocol::ServerMessage::Welcome {
                connection_id: info.connection_id.clone(),
                tenant: info.tenant.clone(),
                user_id: info.user_id.clone(),
                rooms: info.rooms.clone(),
                greeting: Some(text.clone()),
                // The counts the welcome will carry, at their widest.
                counts: info.rooms.iter().map(|room| (room.clone(), u64::MAX)).collect(),
            };
            let size = welcome.to_json().len();
            if size > crate::protocol::MAX_OUTGOING_BYTES {
                greeting = Err(Fault::FrameTooLarge { size, limit: crate::protocol::MAX_OUTGOING_BYTES });
            }
        }
        (greeting, report)
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
    let chat = crate::protocol::ChatMessage {
        id: message.id.clone(),
        room: message.room.clone(),
        user_id: message.user_id.clone(),
        message: text.to_string(),
        timestamp: message.timestamp.clone(),
    };
    crate::protocol::ServerMessage::Message(chat).to_json().len()
}

/// A plugin's routing as the processor applies it: extra rooms without repeats, without the
/// message's own room and without names that are not rooms; users without repeats; each list
/// within the tenant's limits (a longer one is the plugin's fault, not silently cut).
fn narrow(routing: Routing, own_room: &str, limits: &Limits) -> Result<Route, Fault> {
    let mut rooms: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for room in routing.extra_rooms {
        if room != own_room && crate::model::Name::parse("room", &room).is_ok() && seen.insert(room.clone()) {
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
