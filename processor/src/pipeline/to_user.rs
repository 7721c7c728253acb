//! A user message INSERT: a backend's `send_to_user`. The record names the user's connections
//! as the write path found them, so nothing is read here: one `user_message` frame to each.
//! The tenant's plugin is not asked (it decides what members send into rooms; this is the
//! tenant's own backend, to one user).

use crate::model::UserMessage;
use crate::protocol::ServerMessage;
use crate::react::{Effect, Recipient};

/// Pure: the frame to every connection the record names (sorted, each once); nothing when none.
pub fn react(m: &UserMessage) -> Vec<Effect> {
    let mut recipients: Vec<Recipient> = m.recipients.iter().map(Recipient::from).collect();
    recipients.sort_unstable();
    recipients.dedup_by(|a, b| a.connection_id == b.connection_id);
    if recipients.is_empty() {
        return Vec::new();
    }
    let payload = ServerMessage::UserMessage {
        id: m.id.clone(),
        from: m.from.clone(),
        message: m.body.clone(),
        timestamp: crate::model::format_ts(&m.timestamp),
    };
    vec![Effect::Send { payload, recipients }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::tests::{conn, sent, t};

    #[test]
    fn every_named_connection_gets_the_frame_once() {
        let (a, b) = (conn("c2", "ann", &["general"], 0), conn("c1", "ann", &[], 0));
        let m = UserMessage::new("acme", "ann", "billing", "paid".into(), &[a.clone(), b, a], t(5));
        let sent = sent(&react(&m));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1, ["c1", "c2"], "sorted, each once, in a room or none");
        assert_eq!(sent[0].0["action"], "user_message");
        assert_eq!((sent[0].0["from"].as_str(), sent[0].0["message"].as_str()), (Some("billing"), Some("paid")));
        assert_eq!(sent[0].0["id"], m.id.as_str());
        let none = UserMessage::new("acme", "ann", "billing", "paid".into(), &[], t(5));
        assert!(react(&none).is_empty(), "no connection, no effect");
    }
}
